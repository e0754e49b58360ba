"""App module for the coexistence tests' subprocesses (tests/test_coexist_*.py): ours beside
Sentry's Celery integration or ddtrace's Celery patch, in one process, in a chosen order.

Used as the worker's app (``celery -A tests.support.coexist_app worker``) and by the
producer (tests/support/coexist_producer.py), so both initialise the same way.
Environment: BROKER_URL, SPAN_FILE, QUEUE (as prefork.py's launcher sets them), VENDOR
("sentry", "ddtrace" or "none"), ORDER ("theirs-first": the vendor is initialised before
our instrument(), "ours-first": after), SENTRY_DSN, PUBLISHED_FILE (JSON lines: the
headers of every message this process publishes, as the vendor wrote them and as they
left), SERVICE.
"""

from __future__ import annotations

import json
import os
from typing import Any

from celery import signals
from opentelemetry import baggage, trace

from otel_celery_headers import CeleryHeadersInstrumentor
from tests.support.subprocess_app import global_provider, subprocess_app

TRACE_FIELDS = ("traceparent", "tracestate", "baggage", "sentry-trace", "otel_celery_context")


def _strings(mapping: Any) -> dict[str, str] | None:
    if not isinstance(mapping, dict):
        return None
    return {k: v for k, v in mapping.items() if isinstance(k, str) and isinstance(v, str)}


def _record(stage: str, headers: Any) -> None:
    if not isinstance(headers, dict) or not os.environ.get("PUBLISHED_FILE"):
        return
    line = json.dumps({
        "stage": stage, "id": headers.get("id"),
        "top": {k: headers.get(k) for k in TRACE_FIELDS},
        "nested": _strings(headers.get("headers")),
    })
    fd = os.open(os.environ["PUBLISHED_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


# Connected before anyone else's receiver: the headers as apply_async (and Sentry's wrapper
# of it) built them, before any before_task_publish receiver (ours, ddtrace's) ran.
@signals.before_task_publish.connect(weak=False)
def _as_built(headers: Any = None, **_: Any) -> None:
    _record("built", headers)


def _init_vendor() -> None:
    vendor = os.environ.get("VENDOR", "none")
    if vendor == "sentry":
        import sentry_sdk
        from sentry_sdk.integrations.celery import CeleryIntegration

        sentry_sdk.init(
            dsn=os.environ["SENTRY_DSN"], integrations=[CeleryIntegration()],
            traces_sample_rate=1.0, default_integrations=False, auto_enabling_integrations=False,
            environment="coexist", release="coexist@1",
        )
    elif vendor == "ddtrace":
        import ddtrace

        ddtrace.patch(celery=True)


provider = global_provider(os.environ.get("SERVICE", "worker"), schedule_delay_millis=100)
if os.environ.get("ORDER", "theirs-first") == "theirs-first":
    _init_vendor()
    CeleryHeadersInstrumentor().instrument()
else:
    CeleryHeadersInstrumentor().instrument()
    _init_vendor()


# Connected last: the headers as they leave, after ours and ddtrace's receivers. (Not
# after_task_publish: that comes after the message is out, and a retry's record from the
# worker could then land before the original's.)
@signals.before_task_publish.connect(weak=False)
def _as_sent(headers: Any = None, **_: Any) -> None:
    _record("sent", headers)


app = subprocess_app("coexist_app")


@app.task(name="c.report", bind=True, shared=False)
def report(self: Any) -> dict[str, Any]:
    """What the task body sees: its OpenTelemetry context and the message's trace headers."""
    return _seen(self)


@app.task(name="c.retry_report", bind=True, shared=False, max_retries=2)
def retry_report(self: Any) -> dict[str, Any]:
    """Retries once (Celery republishes this message's headers), then reports as c.report."""
    if self.request.retries < 1:
        raise self.retry(countdown=0)
    return _seen(self)


def _seen(self: Any) -> dict[str, Any]:
    span = trace.get_current_span().get_span_context()
    top = self.request.__dict__
    return {
        "id": self.request.id,
        "trace_id": f"{span.trace_id:032x}",
        "span_id": f"{span.span_id:016x}",
        "tracestate": span.trace_state.to_header(),
        "baggage": dict(baggage.get_all()),
        "top": {k: top.get(k) for k in TRACE_FIELDS},
        "nested": _strings(self.request.headers),
    }
