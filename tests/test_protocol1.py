"""Celery's task protocol 1 (its own module: one in-process worker at a time per process;
two running together can keep one from stopping)."""

from __future__ import annotations

from celery import chord
from opentelemetry.trace import SpanKind

from tests.conftest import instrument, make_app, wait_for, worker
from tests.support.spans import by_message, one, trace_id

C = SpanKind.CONSUMER


def test_protocol_1_messages_carry_the_context(redis_url, exporter, tracer):
    """Celery's task protocol 1 (headers in the body) is traced end to end, retry and chord links too."""
    instrumentor = instrument()
    app, t = make_app(redis_url, task_protocol=1, task_default_queue="proto1")
    try:
        with worker(app):
            with tracer.start_as_current_span("request") as root:
                result = t.add.delay(4, 4)
                retried = t.retry_once.delay()
                fan = chord([t.add.s(i, i) for i in range(3)], t.collect.s()).apply_async()
            assert result.get(timeout=20) == 8
            assert retried.get(timeout=20) == 1 and fan.get(timeout=20) == 6
            span = wait_for(lambda spans: one(spans, result.id, C))
            attempts = wait_for(lambda spans: (lambda f: f if len(f) == 2 else None)(
                by_message(spans, retried.id, C)))
            body = wait_for(lambda spans: one(spans, fan.id, C))
    finally:
        instrumentor.uninstrument()
    assert trace_id(span) == trace_id(root)
    # The message's id is in protocol 1's body, not its headers: the retry still links
    # to its first attempt, and the chord body to its three headers.
    assert sorted(len(s.links) for s in attempts) == [0, 1]
    assert len(body.links) == 3
