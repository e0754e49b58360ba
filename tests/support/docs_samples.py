"""Runs one documentation sample in a process of its own and prints its spans as JSON.

``python -m tests.support.docs_samples fastapi|flask|django|in_code|in_child|commands|link|beat``. A process per
sample because each one sets process-wide state the test session must not inherit:
the instrumentor (a singleton), Django's settings, the sample's module names.

The web samples: the framework's own test client makes the request under a stand-in
``POST /orders`` span (the framework's instrumentation is not installed in the test
envs), a solo worker runs the task on the broker in ``CELERY_BROKER_URL``.
``in_code``: ``docs_src/configure_in_code.py`` as written, exporting over OTLP/HTTP to
``OTEL_EXPORTER_OTLP_ENDPOINT``; the caller reads what its receiver got.
``link`` and ``beat``: the shape-and-volume page's samples, their own app on
``CELERY_BROKER_URL`` consumed by a solo worker.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import runpy
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from celery import Celery
from celery.contrib.testing.worker import start_worker
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from otel_celery_headers import TRACE_SHAPE_HEADER, CeleryHeadersInstrumentor

DOCS_SRC = Path(__file__).resolve().parents[2] / "docs_src"


def _web_sample(kind: str) -> tuple[Celery, Any]:
    """(the sample's Celery app, a function making the POST /orders/7 request)."""
    if kind == "fastapi":
        sys.path.insert(0, str(DOCS_SRC / "quickstart"))
        import fastapi_app
        import httpx

        async def post() -> Any:
            # In this thread's event loop (not TestClient's thread), so the request runs
            # in this context, under the stand-in span.
            transport = httpx.ASGITransport(app=fastapi_app.api)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return (await client.post("/orders/7")).json()

        return fastapi_app.celery_app, lambda: asyncio.run(post())
    if kind == "flask":
        sys.path.insert(0, str(DOCS_SRC / "quickstart"))
        import flask_app

        flask_client = flask_app.app.test_client()
        return flask_app.celery_app, lambda: flask_client.post("/orders/7").get_json()
    if kind == "django":
        sys.path.insert(0, str(DOCS_SRC / "quickstart" / "django"))
        import django
        import proj  # sets DJANGO_SETTINGS_MODULE, as its celery.py says
        from django.test import Client

        django.setup()
        django_client = Client()
        return proj.celery_app, lambda: django_client.post("/orders/7").json()
    raise SystemExit(f"unknown sample {kind!r}")


def _traced() -> tuple[InMemorySpanExporter, TracerProvider]:
    """The global SDK, spans kept in memory, and this process instrumented with it."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    CeleryHeadersInstrumentor().instrument(tracer_provider=provider)
    return exporter, provider


def _solo_worker(app: Celery) -> Any:
    app.conf.update(worker_hijack_root_logger=False, broker_connection_retry_on_startup=True)
    return start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=60,
                        loglevel="WARNING")


def _wait_processed(exporter: InMemorySpanExporter, name: str, count: int) -> None:
    """Until ``count`` spans named ``name`` have ended (20 s at most)."""
    deadline = time.monotonic() + 20
    while sum(s.name == name for s in exporter.get_finished_spans()) < count:
        assert time.monotonic() < deadline, [s.name for s in exporter.get_finished_spans()]
        time.sleep(0.05)


def run_web(kind: str) -> list[dict[str, Any]]:
    exporter, provider = _traced()
    app, post = _web_sample(kind)
    with _solo_worker(app):
        with provider.get_tracer("docs").start_as_current_span("POST /orders"):
            reply = post()
        assert reply == {"queued": 7}, reply
        _wait_processed(exporter, "process send_receipt", 1)
    return [_as_dict(span) for span in exporter.get_finished_spans()]


def run_link() -> list[dict[str, Any]]:
    """docs_src/shape_and_volume/fan_out_as_links.py: resize_all() of five images in a request."""
    exporter, provider = _traced()
    sample = runpy.run_path(str(DOCS_SRC / "shape_and_volume" / "fan_out_as_links.py"))
    with _solo_worker(sample["app"]):
        with provider.get_tracer("docs").start_as_current_span("POST /albums/1/resize"):
            sample["resize_all"]([1, 2, 3, 4, 5])
        _wait_processed(exporter, "process images.resize", 5)
    return [_as_dict(span) for span in exporter.get_finished_spans()]


def run_beat() -> dict[str, Any]:
    """docs_src/shape_and_volume/beat_entry_link.py: its entry sent once by a real
    celery.beat.Scheduler (what beat does when the entry is due), the headers of that
    message as before_task_publish sees them, and the spans."""
    from celery.beat import Scheduler
    from celery.signals import before_task_publish

    exporter, _provider = _traced()
    sample = runpy.run_path(str(DOCS_SRC / "shape_and_volume" / "beat_entry_link.py"))
    published: list[dict[str, Any]] = []

    def keep(headers: dict[str, Any] | None = None, **_: Any) -> None:
        published.append(dict(headers or {}))

    before_task_publish.connect(keep, weak=False)
    with _solo_worker(sample["app"]):
        scheduler = Scheduler(sample["app"], lazy=True)
        scheduler.setup_schedule()
        sent = scheduler.apply_async(scheduler.schedule["nightly-report"])
        _wait_processed(exporter, "process reports.nightly", 1)
    return {
        "task_id": sent.id,
        "headers": [{k: v for k, v in h.items() if k in ("id", "task", TRACE_SHAPE_HEADER)}
                    for h in published],
        "spans": [_as_dict(span) for span in exporter.get_finished_spans()],
    }


def run_in_code() -> dict[str, Any]:
    sample = runpy.run_path(str(DOCS_SRC / "configure_in_code.py"))
    # The sample says a second call is ignored, options and all: make one that would
    # trace celery.* tasks if it were not.
    records: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logging.getLogger("opentelemetry.instrumentation.instrumentor").addHandler(_Collect())
    CeleryHeadersInstrumentor().instrument(exclude_tasks=[])
    # Eager runs: the sample's providers are the ones that record (no broker involved).
    app = Celery("in-code", set_as_current=False)
    app.conf.task_always_eager = True

    def nothing() -> None:
        return None

    app.task(name="celery.sample_cleanup")(nothing).delay()
    app.task(name="send_receipt")(nothing).delay()
    sample["tracer_provider"].shutdown()
    sample["meter_provider"].shutdown()
    return {"warnings": records}


def run_in_child() -> dict[str, Any]:
    """docs_src/deployment/instrument_in_child.py: nothing until a pool child starts."""
    from celery.signals import worker_process_init

    sample = runpy.run_path(str(DOCS_SRC / "deployment" / "instrument_in_child.py"))
    before = CeleryHeadersInstrumentor().is_instrumented_by_opentelemetry
    worker_process_init.send(sender=None)
    after = CeleryHeadersInstrumentor().is_instrumented_by_opentelemetry
    return {"app": sample["app"].main, "before": before, "after": after}


def run_commands() -> dict[str, Any]:
    """What the quick starts' command lines name: ``celery -A X`` resolves, as Celery
    resolves it, to the sample's Celery app; the web server's target to the web app."""
    import shlex

    from celery.app.utils import find_app

    found: dict[str, Any] = {}
    for kind, where in (("fastapi", "quickstart"), ("flask", "quickstart"),
                        ("django", "quickstart/django")):
        sys.path.insert(0, str(DOCS_SRC / where))
        for line in (DOCS_SRC / "quickstart" / f"{kind}.sh").read_text().splitlines():
            words = shlex.split(line)
            while words and "=" in words[0] and words[0] != "export":
                assert words.pop(0).startswith("OTEL_SERVICE_NAME="), line  # VAR=value prefix
            if words[:2] == ["export", "DJANGO_SETTINGS_MODULE=proj.settings"]:
                os.environ["DJANGO_SETTINGS_MODULE"] = "proj.settings"
            elif words[:1] == ["opentelemetry-instrument"] and words[1] == "celery":
                app = find_app(words[words.index("-A") + 1])
                found[f"{kind} worker"] = f"{type(app).__name__} {app.main}"
            elif words[:2] == ["opentelemetry-instrument", "uvicorn"]:
                module, _, attr = words[2].partition(":")
                found[f"{kind} web"] = type(getattr(importlib.import_module(module), attr)).__name__
            elif words[:2] == ["opentelemetry-instrument", "flask"]:
                from flask.cli import locate_app

                found[f"{kind} web"] = type(locate_app(words[words.index("--app") + 1], None)).__name__
            elif words[:3] == ["opentelemetry-instrument", "python", "manage.py"]:
                found[f"{kind} web"] = (DOCS_SRC / where / "manage.py").is_file() and words[3]
            else:
                raise SystemExit(f"{kind}.sh: a line this check does not know: {line!r}")
        sys.path.pop(0)
    return found


def run_sample(kind: str, **env: str) -> object:
    """For a test: ``kind`` run in a process of its own with ``env`` added; its RESULT."""
    proc = subprocess.run(
        [sys.executable, "-m", "tests.support.docs_samples", kind],
        cwd=DOCS_SRC.parent, env={**os.environ, **env}, capture_output=True, text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line.removeprefix("RESULT "))


def _as_dict(span: Any) -> dict[str, Any]:
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": span.context.trace_id,
        "span_id": span.context.span_id,
        "parent_id": span.parent.span_id if span.parent else None,
        "links": [link.context.span_id for link in span.links],
        "attributes": {k: v if isinstance(v, (str, int, float, bool)) else list(v)
                       for k, v in (span.attributes or {}).items()},
    }


if __name__ == "__main__":
    which = sys.argv[1]
    runs = {"in_code": run_in_code, "in_child": run_in_child, "commands": run_commands,
            "link": run_link, "beat": run_beat}
    result = runs[which]() if which in runs else run_web(which)
    print("RESULT " + json.dumps(result))
