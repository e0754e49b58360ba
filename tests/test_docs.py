"""The documentation cannot drift from the code: the option reference matches
``options.OPTIONS``, the README's snippets are the files under ``docs_src/``, and every
sample runs (FastAPI's docs_src + tests/test_tutorial pattern)."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from otel_celery_headers import options
from tests.support.docs_samples import run_sample
from tests.support.example import load

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
CONFIG_PAGE = DOCS / "reference" / "configuration.md"

#: A fenced block: ```lang ... ```, the language and the body; also indented, in a list.
_FENCE = re.compile(r"^[ \t]*```(\w*)\n(.*?)^[ \t]*```$", re.M | re.S)
_MARKER = re.compile(r"<!-- snippet: (\S+) -->\n```\w*\n(.*?)^```$", re.M | re.S)
_INCLUDE = re.compile(r'--8<-- "([^"]+)"')


# -- the configuration reference ------------------------------------------------------


def _config_rows() -> dict[str, list[str]]:
    """keyword -> the cells of its row, from the table of the page's "## Options"."""
    rows = {}
    section = CONFIG_PAGE.read_text().split("\n## Options\n", 1)[-1].split("\n## ", 1)[0]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and re.fullmatch(r"`\w+`", cells[0]):
            rows[cells[0].strip("`")] = cells
    return rows


def _expected_row(option: options._Option) -> str:
    default = {f.name: f.default for f in dataclasses.fields(options.Options)}[option.name]
    return f"| `{option.name}` | `{option.env}` | <type> | `{default!r}` | <meaning> |"


def test_configuration_page_lists_every_option_with_its_variable_and_default() -> None:
    """docs/reference/configuration.md has one row per option of options.OPTIONS (and
    the providers), each with the option's variable and default, and no other row."""
    rows = _config_rows()
    wanted = {o.name: o for o in options.OPTIONS}
    problems = []
    for name, option in wanted.items():
        expected = _expected_row(option)
        if name not in rows:
            problems.append(
                f"missing row for option {name!r}; add to the table under '## Options' in "
                f"{CONFIG_PAGE.relative_to(ROOT)}:\n  {expected}"
            )
            continue
        cells = rows[name]
        want = [f"`{option.name}`", f"`{option.env}`", None, expected.split(" | ")[3], None]
        for i, column in ((1, "environment variable"), (3, "default")):
            if cells[i] != want[i]:
                problems.append(
                    f"row {name!r}: {column} is {cells[i]} in the page, the code says {want[i]}"
                )
    for name in sorted(set(rows) - set(wanted) - set(options._PROVIDERS)):
        problems.append(f"extra row {name!r}: no such option in options.OPTIONS; remove it")
    for name in sorted(set(options._PROVIDERS) - set(rows)):
        problems.append(f"missing row for keyword {name!r} (a provider)")
    assert not problems, "\n".join(problems)


def test_instrument_keywords_are_the_documented_ones() -> None:
    """Every key of InstrumentKwargs has a row (a keyword nobody can look up is a bug)."""
    assert set(options.InstrumentKwargs.__annotations__) == set(_config_rows())


# -- README and docs snippets ---------------------------------------------------------


def test_readme_snippets_are_the_files_under_docs_src() -> None:
    """Each README code block (but the waterfall and `make` lines) is marked
    `<!-- snippet: path -->` and is that file, byte for byte."""
    text = README.read_text()
    marked = {body for _path, body in _MARKER.findall(text)}
    for lang, body in _FENCE.findall(text):
        if lang == "text":
            continue  # output (the waterfall), not a sample
        if all(line.startswith("make ") for line in body.splitlines()):
            continue  # checked against the Makefile below
        assert body in marked, f"README block without a snippet marker:\n{body}"
    assert len(_MARKER.findall(text)) >= 6
    for path, body in _MARKER.findall(text):
        assert (ROOT / path).read_text() == body, f"README's block differs from {path}"


def test_readme_make_commands_are_makefile_targets() -> None:
    """`make demo` and `make test`, as the README says, are targets of the Makefile."""
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    commands = set(re.findall(r"^make ([\w-]+)", README.read_text(), re.M))
    assert commands == {"demo", "test"}
    assert commands <= targets


def test_readme_links_point_at_existing_pages() -> None:
    """The README's relative links (docs/..., benchmarks/...) open a file on GitHub."""
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README.read_text())
    local = [link for link in links if not link.startswith("http")]
    assert local, "the README links into the docs"
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, missing


def _pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def test_docs_python_samples_are_included_files() -> None:
    """A Python block in a page is only an include of a real file (docs_src/ or an
    example project), never inline code that no test runs."""
    for page in _pages():
        for lang, body in _FENCE.findall(page.read_text()):
            if lang in {"python", "py"}:
                lines = [line for line in body.splitlines() if line.strip()]
                assert lines and all(_INCLUDE.search(line) for line in lines), (
                    f"{page.relative_to(ROOT)}: inline Python block, make it a file:\n{body}"
                )
        for path in _INCLUDE.findall(page.read_text()):
            assert (ROOT / path.split(":")[0]).is_file(), f"{page.name} includes missing {path}"


def test_every_docs_src_file_is_shown() -> None:
    """No sample file is dead: each is included by a page or shown in the README."""
    shown = set(_MARKER.findall(README.read_text()))
    used = {path for path, _ in shown}
    for page in _pages():
        used |= {p.split(":")[0] for p in _INCLUDE.findall(page.read_text())}
    files = {
        str(p.relative_to(ROOT)) for p in (ROOT / "docs_src").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    # The Django project's plumbing runs in test_web_quickstart_traces_one_request.
    plumbing = {f for f in files if "/django/" in f and not f.endswith("celery.py")}
    assert not files - used - plumbing, sorted(files - used - plumbing)


# -- the samples run ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fastapi", "flask", "django"])
def test_web_quickstart_traces_one_request(kind: str, redis_url: str) -> None:
    """The README's quick start for each framework, as written: the request's span, the
    publish under it, and the task's span under the publish, in one trace."""
    spans = run_sample(kind, CELERY_BROKER_URL=redis_url)
    assert isinstance(spans, list)
    ours = sorted(s["name"] for s in spans if "send_receipt" in s["name"])
    assert ours == ["process send_receipt", "send send_receipt"]
    by_id = {s["span_id"]: s for s in spans}
    send, process = (
        next(s for s in spans if s["name"] == name)
        for name in ("send send_receipt", "process send_receipt")
    )
    assert send["kind"] == "PRODUCER" and process["kind"] == "CONSUMER"
    # The trace's root is the request: the stand-in, or the SERVER span of a FastAPI
    # recent enough to trace itself (it starts its own trace from the request's headers).
    root = send
    while root["parent_id"] is not None:
        root = by_id[root["parent_id"]]
    assert root["name"] in {"POST /orders", "POST /orders/{order_id}"}
    assert process["parent_id"] == send["span_id"]
    assert root["trace_id"] == send["trace_id"] == process["trace_id"]


def test_configure_in_code_sample_exports_and_a_second_call_is_ignored() -> None:
    """docs_src/configure_in_code.py exports over OTLP/HTTP with its options in force;
    a second instrument() call changes nothing and says so."""
    receiver_module = load("otlp_receiver")
    with receiver_module.OTLPReceiver(grpc=False) as receiver:
        result = run_sample(
            "in_code", OTEL_EXPORTER_OTLP_ENDPOINT=receiver.http_endpoint,
            OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
        )
        span = receiver.wait_for_span(name="process send_receipt", timeout=10)
        assert span["service.name"] == "shop-worker"
        names = sorted(s["name"] for s in receiver.spans())
    assert names == ["process send_receipt"]  # exclude_tasks=["celery.*"] still holds
    assert isinstance(result, dict)
    assert any("already instrumented" in w for w in result["warnings"]), result


def test_instrument_in_child_sample_instruments_each_pool_child_only() -> None:
    """docs_src/deployment/instrument_in_child.py instruments nothing at import, and
    instruments the process once worker_process_init is sent (as in each pool child)."""
    assert run_sample("in_child") == {"app": "proj", "before": False, "after": True}


def test_quick_start_command_lines_name_the_samples_apps() -> None:
    """Each quick start's `celery -A ...` resolves (as Celery resolves it) to the sample's
    Celery app, and its web command to the sample's web app."""
    assert run_sample("commands") == {
        "fastapi worker": "Celery shop", "fastapi web": "FastAPI",
        "flask worker": "Celery shop", "flask web": "Flask",
        "django worker": "Celery proj", "django web": "runserver",
    }


@pytest.mark.parametrize(("disabled", "instrumented"), [("", True), ("celery_headers", False)])
def test_opentelemetry_instrument_loads_us_by_the_entry_point_the_docs_name(
    disabled: str, instrumented: bool
) -> None:
    """`opentelemetry-instrument` instruments Celery through our `celery_headers` entry
    point, and `OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=celery_headers` (configuration,
    migrating) turns exactly us off."""
    script = (
        "from otel_celery_headers import CeleryHeadersInstrumentor as I; "
        "print('INSTRUMENTED', I().is_instrumented_by_opentelemetry)"
    )
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "opentelemetry-instrument"), sys.executable, "-c", script],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": disabled,
             "OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none",
             "OTEL_LOGS_EXPORTER": "none"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"INSTRUMENTED {instrumented}" in proc.stdout.splitlines(), proc.stdout + proc.stderr


_DJANGO_PROJECT = ROOT / "docs_src" / "quickstart" / "django"
_DJANGO_PROBE = (
    "import proj, django.conf; proj.celery_app.loader.import_default_modules(); "
    "print('TASKS', sorted(t for t in proj.celery_app.tasks if not t.startswith('celery.'))); "
    "print('HOSTS', django.conf.settings.ALLOWED_HOSTS)"
)


def _instrumented(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    """`opentelemetry-instrument <args>` in the Django quick start's project."""
    environ = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    environ.update(OTEL_TRACES_EXPORTER="none", OTEL_METRICS_EXPORTER="none",
                   OTEL_LOGS_EXPORTER="none", **env)
    return subprocess.run(
        [str(Path(sys.executable).parent / "opentelemetry-instrument"), *args],
        cwd=_DJANGO_PROJECT, env=environ, capture_output=True, text=True, timeout=120,
    )


def test_django_settings_module_not_exported_gives_the_misleading_errors() -> None:
    """The README's Django warning, as a user meets it: without DJANGO_SETTINGS_MODULE in
    the environment, Django's instrumentation loads empty settings, runserver stops on
    ALLOWED_HOSTS and the Celery app finds no task; exported, both are right."""
    runserver = _instrumented([sys.executable, "manage.py", "runserver", "--noreload"])
    assert runserver.returncode == 1
    assert "You must set settings.ALLOWED_HOSTS if DEBUG is False." in runserver.stderr
    unset = _instrumented([sys.executable, "-c", _DJANGO_PROBE])
    assert unset.returncode == 0, unset.stderr[-3000:]
    assert unset.stdout.splitlines() == ["TASKS []", "HOSTS []"]
    exported = _instrumented([sys.executable, "-c", _DJANGO_PROBE],
                             DJANGO_SETTINGS_MODULE="proj.settings")
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert exported.stdout.splitlines() == [
        "TASKS ['send_receipt']", "HOSTS ['localhost', '127.0.0.1', 'testserver']"
    ]
