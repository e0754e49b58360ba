"""RabbitMQ, where headers are AMQP tables rather than JSON: types, sizes, the paths that republish."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from celery import chain, chord
from opentelemetry import baggage, context
from opentelemetry.trace import SpanKind

from tests.conftest import instrument, make_app, wait_for, worker
from tests.support.spans import attr, by_message, one, parent_id, span_id, trace_id

P, C = SpanKind.PRODUCER, SpanKind.CONSUMER


@pytest.fixture(scope="module")
def env(rabbitmq_url: str, redis_url: str) -> Iterator[SimpleNamespace]:
    instrumentor = instrument()
    app, tasks = make_app(rabbitmq_url, backend=redis_url)
    try:
        with worker(app):
            yield SimpleNamespace(app=app, t=tasks)
    finally:
        instrumentor.uninstrument()


def test_delay_over_rabbitmq(env, exporter, tracer):
    """The context survives AMQP header tables; messaging.system says rabbitmq."""
    with tracer.start_as_current_span("request") as root:
        result = env.t.add.delay(1, 2)
    assert result.get(timeout=20) == 3
    consumer = wait_for(lambda spans: one(spans, result.id, C))
    producer = one(exporter.get_finished_spans(), result.id, P)
    assert trace_id(consumer) == trace_id(root)
    assert parent_id(consumer) == span_id(producer)
    assert attr(consumer, "messaging.system") == attr(producer, "messaging.system") == "rabbitmq"


def test_user_header_types_survive(env, exporter, tracer):
    """The user's non-string headers reach the task with their types, beside ours."""
    with tracer.start_as_current_span("request"):
        result = env.t.header.apply_async(("x-count",), headers={"x-count": 7})
    assert result.get(timeout=20) == 7


def test_retry_and_chain_over_rabbitmq(env, exporter, tracer):
    """Republishing paths (retry, chain steps) stay in one trace on RabbitMQ."""
    with tracer.start_as_current_span("request") as root:
        retried = env.t.retry_once.delay()
        chained = chain(env.t.add.s(1, 1), env.t.add.s(1)).apply_async()
    assert retried.get(timeout=20) == 1 and chained.get(timeout=20) == 3
    attempts = wait_for(lambda spans: (lambda f: f if len(f) == 2 else None)(by_message(spans, retried.id, C)))
    assert {trace_id(s) for s in attempts} == {trace_id(root)}
    first, second = sorted(attempts, key=lambda s: attr(s, "celery.task.retries"))
    assert [link.context.span_id for link in second.links] == [span_id(first)]
    assert trace_id(wait_for(lambda spans: one(spans, chained.id, C))) == trace_id(root)


def test_oversized_baggage_is_capped_and_the_message_is_delivered(env, exporter, tracer):
    """200 KB of baggage (over RabbitMQ's 128 KiB frame): capped to 8192 bytes, the task runs and keeps the first members."""
    ctx = context.get_current()
    for i in range(2000):
        ctx = baggage.set_baggage(f"key{i:04d}", "v" * 90, ctx)
    token = context.attach(ctx)
    try:
        with tracer.start_as_current_span("request") as root:
            result = env.t.whoami.delay()
    finally:
        context.detach(token)
    seen = result.get(timeout=20)
    assert seen["trace_id"] == format(trace_id(root), "032x")
    assert 0 < len(seen["baggage"]) < 2000
    assert "key0000" in seen["baggage"]
    assert len(",".join(f"{k}={v}" for k, v in seen["baggage"].items())) <= 8192


def test_chord_fan_in_over_rabbitmq(env, exporter, tracer):
    """The body's links to its headers travel in an AMQP header table too."""
    with tracer.start_as_current_span("request") as root:
        result = chord([env.t.add.s(i, i) for i in range(4)], env.t.collect.s()).apply_async()
    assert result.get(timeout=20) == 12
    body = wait_for(lambda spans: one(spans, result.id, C))
    headers = wait_for(lambda spans: (lambda found: found if len(found) == 4 else None)(
        [s for s in spans if s.kind == C and s.name == "process t.add" and trace_id(s) == trace_id(root)
         and attr(s, "celery.task.group_id")]))
    assert sorted(link.context.span_id for link in body.links) == sorted(span_id(s) for s in headers)
