"""Run an example web project's processes (web server, worker) as a user would:
each under ``opentelemetry-instrument``, exporting over OTLP/HTTP to a receiver the
test runs (``examples/fastapi_celery/otlp_receiver.py``)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"

Span = dict[str, Any]

# Instrumentations that would add spans nobody asked for if installed (kombu's
# Redis polling, the HTTP clients, ...). Those the examples use stay on: django,
# flask, sqlite3 and ours; the official celery one stands down by itself.
DISABLED_INSTRUMENTATIONS = (
    "redis,urllib,urllib3,requests,httpx,logging,threading,asyncio,sqlalchemy,fastapi"
)


def instrument_command() -> str:
    """The ``opentelemetry-instrument`` beside this Python (a venv's or tox's)."""
    found = shutil.which("opentelemetry-instrument", path=str(Path(sys.executable).parent)) \
        or shutil.which("opentelemetry-instrument")
    assert found, "opentelemetry-instrument not found (pip install -e '.[demo]')"
    return found


def otel_env(endpoint: str, service: str, **extra: str) -> dict[str, str]:
    """This machine's environment without its OTEL_* settings (an endpoint, a sampler,
    other propagators...) and DJANGO_SETTINGS_MODULE (a test that wants it says so),
    plus the example's: spans only, to ``endpoint``, exported within a tenth of a
    second."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("OTEL_") and name != "DJANGO_SETTINGS_MODULE"}
    env.update(
        OTEL_SERVICE_NAME=service,
        OTEL_TRACES_EXPORTER="otlp",
        OTEL_METRICS_EXPORTER="none",
        OTEL_LOGS_EXPORTER="none",
        OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
        OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
        OTEL_BSP_SCHEDULE_DELAY="100",
        OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=DISABLED_INSTRUMENTATIONS,
        PYTHONUNBUFFERED="1",
        # opentelemetry-instrument finds `celery`, `gunicorn`... on PATH: this
        # Python's scripts first, as in an activated venv.
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    )
    env.update(extra)
    return env


class Process:
    """A subprocess with its output in a log file; ``stop()`` ends it gracefully
    (SIGTERM: a worker's warm shutdown, gunicorn's graceful stop), then by force."""

    def __init__(self, name: str, argv: list[str], cwd: Path, env: dict[str, str],
                 log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float) -> str:
        """Until ``text`` is in the output (the process still running); the output."""
        deadline = time.monotonic() + timeout
        while True:
            output = self.log()
            if text in output:
                return output
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited {self.proc.returncode} before "
                                     f"printing {text!r}:\n{output[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no {text!r} after {timeout}s:\n"
                                     f"{output[-3000:]}")
            time.sleep(0.05)

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still running after {timeout}s:\n"
                                 f"{self.log()[-3000:]}") from None

    def stop(self, timeout: float = 20) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:  # the whole group: pool children, gunicorn workers
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(5)


def traceparent() -> tuple[str, str, str]:
    """``(trace id, parent span id, header value)`` of a caller's sampled span: an
    upstream service (or a browser's RUM) that calls the example."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


def post_json(url: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, Any]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json", **headers},
        method="POST")
    with urllib.request.urlopen(request, timeout=15) as response:
        return response.status, json.loads(response.read())


def children(spans: list[Span], parent: Span, **criteria: Any) -> list[Span]:
    """The spans whose parent is ``parent`` (direct children only), optionally those
    whose keys equal ``criteria`` (``kind="CLIENT"``...)."""
    return [s for s in spans if s["parent_span_id"] == parent["span_id"]
            and all(s.get(key) == value for key, value in criteria.items())]


def sql_statement(span: Span) -> str:
    attributes = span["attributes"]
    return str(attributes.get("db.statement") or attributes.get("db.query.text") or span["name"])
