"""Celery's task protocol 1 (its own module: one in-process worker at a time per process;
two running together can keep one from stopping)."""

from __future__ import annotations

from opentelemetry.trace import SpanKind

from tests.conftest import instrument, make_app, wait_for, worker
from tests.support.spans import one, trace_id

C = SpanKind.CONSUMER


def test_protocol_1_messages_carry_the_context(redis_url, exporter, tracer):
    """Celery's task protocol 1 (headers in the body) is traced end to end."""
    instrumentor = instrument()
    app, t = make_app(redis_url, task_protocol=1, task_default_queue="proto1")
    try:
        with worker(app):
            with tracer.start_as_current_span("request") as root:
                result = t.add.delay(4, 4)
            assert result.get(timeout=20) == 8
            span = wait_for(lambda spans: one(spans, result.id, C))
    finally:
        instrumentor.uninstrument()
    assert trace_id(span) == trace_id(root)
