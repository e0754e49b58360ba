"""Trace shape per task (child, link, ignore), exclusions, celery beat, and metrics."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from celery import chord
from celery.beat import Scheduler
from opentelemetry import baggage, context
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.trace import SpanKind

from tests.conftest import make_app, wait_for, worker
from tests.support.fixtures import instrumented_with  # noqa: F401 - fixtures
from tests.support.spans import attr, by_message, one, parent_id, span_id, trace_id

P, C = SpanKind.PRODUCER, SpanKind.CONSUMER


@pytest.fixture(scope="module")
def env(redis_url: str) -> Iterator[SimpleNamespace]:
    app, tasks = make_app(redis_url, task_default_queue="shapes")
    with worker(app):
        yield SimpleNamespace(app=app, t=tasks)


def publish_with_baggage(tracer, task, *args):
    token = context.attach(baggage.set_baggage("tenant", "acme"))
    try:
        with tracer.start_as_current_span("request") as root:
            result = task.delay(*args)
    finally:
        context.detach(token)
    return root, result


def test_link_shape_new_trace_linked_to_the_publish_and_keeps_baggage(env, exporter, tracer, instrumented_with):
    """trace_shape=link: the task starts a new trace, links to its publish span, and still sees the baggage."""
    instrumented_with(trace_shape={"t.whoami": "link"})
    root, result = publish_with_baggage(tracer, env.t.whoami)
    seen = result.get(timeout=20)
    span = wait_for(lambda spans: one(spans, result.id, C))
    producer = one(exporter.get_finished_spans(), result.id, P)
    assert span.parent is None and trace_id(span) != trace_id(root)
    assert [link.context.span_id for link in span.links] == [span_id(producer)]
    assert seen["baggage"] == {"tenant": "acme"}
    assert seen["trace_id"] == format(trace_id(span), "032x")
    assert attr(span, "celery.trace_shape") == "link"


def test_ignore_shape_trusts_nothing_inbound(env, exporter, tracer, instrumented_with):
    """trace_shape=ignore: new trace, no link, no baggage from the message."""
    instrumented_with(trace_shape=lambda name: "ignore" if name == "t.whoami" else "child")
    root, result = publish_with_baggage(tracer, env.t.whoami)
    seen = result.get(timeout=20)
    span = wait_for(lambda spans: one(spans, result.id, C))
    assert span.parent is None and not span.links
    assert seen["baggage"] == {} and seen["trace_id"] != format(trace_id(root), "032x")


def test_shape_by_glob_leaves_other_tasks_as_children(env, exporter, tracer, instrumented_with):
    """A glob rule applies only to the tasks it matches."""
    instrumented_with(trace_shape={"reports.*": "ignore"})
    with tracer.start_as_current_span("request") as root:
        result = env.t.add.delay(1, 1)
    result.get(timeout=20)
    span = wait_for(lambda spans: one(spans, result.id, C))
    assert trace_id(span) == trace_id(root)


def test_excluded_task_has_no_span_but_passes_the_context_on(env, exporter, tracer, instrumented_with):
    """An excluded task gets no span, yet what it publishes stays in the caller's trace."""
    instrumented_with(exclude_tasks=["t.publish_*"])
    with tracer.start_as_current_span("request") as root:
        result = env.t.publish_child.delay()
    child_id = result.get(timeout=20)
    child = wait_for(lambda spans: one(spans, child_id, C))
    assert trace_id(child) == trace_id(root)
    assert not by_message(exporter.get_finished_spans(), result.id, C)
    child_publish = one(exporter.get_finished_spans(), child_id, P)
    assert parent_id(child_publish) == span_id(one(exporter.get_finished_spans(), result.id, P))


def test_beat_entry_is_a_new_trace_per_due_run(env, exporter, tracer, instrumented_with):
    """celery beat: each due entry is its own trace, named after the schedule entry, even under an active span."""
    instrumented_with()
    env.app.conf.beat_schedule = {"nightly-sum": {"task": "t.add", "schedule": 1.0, "args": (2, 2)}}
    scheduler = Scheduler(env.app, lazy=True)
    scheduler.setup_schedule()
    entry = scheduler.schedule["nightly-sum"]
    with tracer.start_as_current_span("unrelated") as unrelated:
        first = scheduler.apply_async(entry)
        second = scheduler.apply_async(entry)
    assert first.get(timeout=20) == second.get(timeout=20) == 4
    traces = set()
    for result in (first, second):
        span = wait_for(lambda spans, r=result: one(spans, r.id, C))
        producer = one(exporter.get_finished_spans(), result.id, P)
        assert producer.parent is None and attr(producer, "celery.beat.entry") == "nightly-sum"
        assert parent_id(span) == span_id(producer)
        traces.add(trace_id(span))
    assert len(traces) == 2 and trace_id(unrelated) not in traces


def test_metrics_are_recorded_with_bounded_attributes(env, exporter, tracer, instrumented_with):
    """Publish and process counters and histograms, queue time, in UCUM units, with no task ids.

    A MeterProvider of this test's own: the counts are exactly this test's messages.
    """
    reader = InMemoryMetricReader()
    instrumented_with(meter_provider=MeterProvider(metric_readers=[reader]))
    results = [env.t.add.delay(i, i) for i in range(3)]
    failed = env.t.fail.delay()
    assert [r.get(timeout=20) for r in results] == [0, 2, 4]
    with pytest.raises(ValueError):
        failed.get(timeout=20)
    # The worker counts a delivery just after its span ends (Request.on_success, see
    # deliveries.py): the solo worker runs in order, so once the fence is counted, all
    # of the above are in.
    fence = env.t.add.delay(0, 0)
    assert fence.get(timeout=20) == 0

    def ours() -> dict:
        data = reader.get_metrics_data()
        return {m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics
                if sm.scope.name == "otel_celery_headers" for m in sm.metrics}

    def fenced(_: object) -> dict | None:
        found = ours()
        consumed = found.get("messaging.client.consumed.messages")
        adds = sum(p.value for p in consumed.data.data_points
                   if p.attributes["celery.task.name"] == "t.add") if consumed else 0
        return found if adds == 4 else None

    metrics = wait_for(fenced)
    assert set(metrics) == {
        "messaging.client.sent.messages", "messaging.client.operation.duration",
        "messaging.client.consumed.messages", "messaging.process.duration", "celery.message.queue_time",
    }
    assert metrics["messaging.client.sent.messages"].unit == "{message}"
    assert metrics["messaging.client.consumed.messages"].unit == "{message}"
    assert metrics["messaging.client.operation.duration"].unit == "s"
    assert metrics["messaging.process.duration"].unit == "s"
    assert metrics["celery.message.queue_time"].unit == "s"

    def points(name: str) -> list:
        """(attributes, count or value) of each point, sorted by task name."""
        return sorted(((dict(p.attributes), p.count if hasattr(p, "count") else p.value)
                       for p in metrics[name].data.data_points), key=lambda item: item[0]["celery.task.name"])

    base = {"messaging.system": "redis", "messaging.destination.name": "shapes"}
    send = {**base, "messaging.operation.name": "send"}
    process = {**base, "messaging.operation.name": "process"}
    # 4 t.add (3 + the fence) and 1 t.fail, on each side.
    published = [({**send, "celery.task.name": "t.add"}, 4), ({**send, "celery.task.name": "t.fail"}, 1)]
    assert points("messaging.client.sent.messages") == published
    assert points("messaging.client.operation.duration") == published
    processed = [
        ({**process, "celery.task.name": "t.add", "celery.task.state": "SUCCESS"}, 4),
        ({**process, "celery.task.name": "t.fail", "celery.task.state": "FAILURE", "error.type": "ValueError"}, 1),
    ]
    assert points("messaging.client.consumed.messages") == processed
    assert points("messaging.process.duration") == processed
    # Time in queue is recorded when the task starts: no outcome is known yet.
    assert points("celery.message.queue_time") == [
        ({**process, "celery.task.name": "t.add"}, 4), ({**process, "celery.task.name": "t.fail"}, 1)]
    ids = {r.id for r in results} | {failed.id, fence.id}
    for metric in metrics.values():
        for point in metric.data.data_points:
            assert not ids & {str(v) for v in point.attributes.values()}
            assert attr_keys_bounded(point.attributes)


def attr_keys_bounded(attributes) -> bool:
    allowed = {"messaging.system", "messaging.destination.name", "messaging.operation.name",
               "celery.task.name", "celery.task.state", "error.type"}
    return set(attributes) <= allowed


@pytest.mark.parametrize("enabled", [True, False])
def test_chord_links_option_and_its_backend_keys(env, exporter, tracer, instrumented_with, enabled):
    """chord_links (default on) stores one key per header and links the body; off: no key, no link."""
    instrumented_with(chord_links=enabled)
    with tracer.start_as_current_span("request") as root:
        result = chord([env.t.add.s(i, i) for i in range(3)], env.t.collect.s()).apply_async()
    assert result.get(timeout=20) == 6
    body = wait_for(lambda spans: one(spans, result.id, C))
    assert trace_id(body) == trace_id(root)
    client = env.app.backend.client
    keys = client.keys(f"*{result.parent.id}*otel*")
    if enabled:
        assert len(body.links) == 3 and len(keys) == 1 and client.llen(keys[0]) == 3
        # The app's result_expires (300 s, see make_app), not the one-day fallback nor forever.
        assert env.app.conf.result_expires == 300
        assert 0 < client.ttl(keys[0]) <= 300
    else:
        assert not body.links and keys == []
