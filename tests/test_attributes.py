"""Span attributes the docs promise (docs/reference/spans.md), each checked for its exact value: eager mode,
the conversation id of a workflow, and hooks given as ``module:function`` environment
variables (in-process solo worker, Redis).

``celery.worker.hostname`` is checked on a `celery worker` subprocess (test_lost.py):
Celery's in-process test worker skips ``setup_worker_optimizations``, so its
``task.request.hostname`` is the machine's host name, not the worker's node name.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from celery import chain
from opentelemetry.trace import SpanKind

from tests.conftest import instrument, make_app, wait_for, worker
from tests.support import hooks
from tests.support.spans import attr, by_message, one, parent_id, span_id, trace_id

P, C = SpanKind.PRODUCER, SpanKind.CONSUMER
QUEUE = "attributes"
HOOKS = {
    "OTEL_PYTHON_CELERY_HEADERS_PUBLISH_HOOK": "tests.support.hooks:publish_hook",
    "OTEL_PYTHON_CELERY_HEADERS_PROCESS_HOOK": "tests.support.hooks:process_hook",
}


@pytest.fixture(scope="module")
def env(redis_url: str) -> Iterator[SimpleNamespace]:
    """Instrumented with the two hooks named only by the environment, then a solo worker."""
    saved = {name: os.environ.get(name) for name in HOOKS}
    os.environ.update(HOOKS)
    try:
        instrumentor = instrument()
    finally:
        # Read once, when instrument() runs: the environment can go back at once.
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    app, tasks = make_app(redis_url, task_default_queue=QUEUE)
    try:
        with worker(app):
            yield SimpleNamespace(app=app, t=tasks)
    finally:
        instrumentor.uninstrument()


def pair(task_id: str) -> tuple:
    """The ended producer and consumer spans of one message."""
    def both(spans):
        producer, consumer = one(spans, task_id, P), one(spans, task_id, C)
        return (producer, consumer) if producer and consumer else None

    return wait_for(both)


def test_a_task_run_by_a_worker_is_not_eager(env, exporter, tracer):
    """celery.task.eager is only on eager spans: absent when a worker runs the task."""
    with tracer.start_as_current_span("request"):
        result = env.t.add.delay(1, 2)
    assert result.get(timeout=20) == 3
    _, consumer = pair(result.id)
    assert attr(consumer, "celery.task.eager") is None


def test_apply_is_eager(env, exporter, tracer):
    """apply(): one CONSUMER span, child of the caller, celery.task.eager true, no publish."""
    with tracer.start_as_current_span("request") as root:
        result = env.t.add.apply((2, 3))
    assert result.get() == 5
    spans = exporter.get_finished_spans()
    (span,) = by_message(spans, result.id, C)
    assert attr(span, "celery.task.eager") is True
    assert parent_id(span) == span_id(root)
    assert by_message(spans, result.id, P) == []


def test_task_always_eager_is_eager(redis_url, env, exporter, tracer):
    """task_always_eager: delay() runs in place; its span says celery.task.eager true."""
    _app, tasks = make_app(redis_url, task_always_eager=True)
    with tracer.start_as_current_span("request") as root:
        result = tasks.add.delay(4, 5)
    assert result.get() == 9
    spans = exporter.get_finished_spans()
    (span,) = by_message(spans, result.id, C)
    assert attr(span, "celery.task.eager") is True
    assert trace_id(span) == trace_id(root) and parent_id(span) == span_id(root)
    assert by_message(spans, result.id, P) == []


def test_conversation_id_is_the_root_task_id_across_a_chain(env, exporter, tracer):
    """messaging.message.conversation_id: the chain's first task id, on every step's send and process span."""
    with tracer.start_as_current_span("request"):
        result = chain(env.t.add.s(1, 2), env.t.add.s(10), env.t.add.s(100)).apply_async()
    assert result.get(timeout=20) == 113
    root_id = result.parent.parent.id
    ids = [root_id, result.parent.id, result.id]
    assert len(set(ids)) == 3
    for task_id in ids:
        producer, consumer = pair(task_id)
        assert attr(producer, "messaging.message.conversation_id") == root_id
        assert attr(consumer, "messaging.message.conversation_id") == root_id


def test_hooks_from_the_environment_run_and_set_their_attributes(env, exporter, tracer):
    """OTEL_PYTHON_CELERY_HEADERS_PUBLISH_HOOK / _PROCESS_HOOK as module:function: each hook runs once per span."""
    hooks.CALLS.clear()
    with tracer.start_as_current_span("request"):
        result = env.t.add.delay(3, 4)
    assert result.get(timeout=20) == 7
    producer, consumer = pair(result.id)
    assert attr(producer, "test.publish_hook") == "t.add"
    assert attr(consumer, "test.process_hook") == "t.add"
    assert attr(producer, "test.process_hook") is None and attr(consumer, "test.publish_hook") is None
    assert hooks.CALLS == [("publish", "t.add"), ("process", "t.add")]
