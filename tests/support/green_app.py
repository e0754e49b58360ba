"""App module for `celery -A tests.support.green_app worker --pool gevent|eventlet` subprocesses.

Environment: BROKER_URL, SPAN_FILE (JSON lines), QUEUE. Instrumented at import; spans
go through a BatchSpanProcessor that exports every 200 ms, so they reach the file
while the worker runs (a green pool has no pool child to flush on its way out).
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from opentelemetry import trace

from otel_celery_headers import CeleryHeadersInstrumentor
from tests.support.subprocess_app import global_provider, subprocess_app
from tests.support.tasks import register

global_provider("green-worker", schedule_delay_millis=200)
# redis-py's pools stop at 100 connections; 200 green threads can each hold one.
app = subprocess_app("green_app", redis_max_connections=1000)
tasks = register(app)
CeleryHeadersInstrumentor().instrument()

_client = redis.Redis.from_url(os.environ["BROKER_URL"], max_connections=1000)
_tracer = trace.get_tracer("tests.green-body")


def _seen() -> dict[str, str]:
    ctx = trace.get_current_span().get_span_context()
    return {"trace_id": format(ctx.trace_id, "032x"), "span_id": format(ctx.span_id, "016x")}


@app.task(name="r.rendezvous", shared=False)
def rendezvous(key: str, parties: int, timeout: float = 60.0) -> dict[str, Any]:
    """Wait until ``parties`` tasks (this one included) are running at once; report the context seen.

    The context is read before and after the wait, and from inside a span the body opens
    around the wait: while this task waits, every other one runs and switches greenlets.
    """
    before = _seen()
    with _tracer.start_as_current_span("rendezvous-body"):
        arrived = int(_client.incr(key))
        deadline = time.monotonic() + timeout
        met = arrived >= parties
        while not met and time.monotonic() < deadline:
            time.sleep(0.1)
            met = int(_client.get(key) or 0) >= parties
        inside = _seen()
    return {"before": before, "inside": inside, "after": _seen(), "met": met}
