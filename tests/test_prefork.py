"""The prefork pool, in a real `celery worker` subprocess: flushed children, no leaks."""

from __future__ import annotations

import pytest
from celery import chord
from opentelemetry.trace import SpanKind

from tests.conftest import make_app, wait_for
from tests.support.prefork import prefork_worker
from tests.support.raw import publish_raw
from tests.support.spans import one, span_id, trace_id

P = SpanKind.PRODUCER



def hexid(value: int, width: int) -> str:
    return format(value, f"0{width}x")


def consumer_for(spans, task_id):
    found = [s for s in spans if s["kind"] == "CONSUMER"
             and s["attributes"].get("messaging.message.id") == task_id]
    assert len(found) <= 1, f"duplicated consumer span for {task_id}"
    return found[0] if found else None


@pytest.mark.parametrize("instrument_at", ["import", "process_init"])
def test_recycled_children_lose_no_span(redis_url, tmp_path, exporter, tracer, producer_side, instrument_at):
    """--max-tasks-per-child 1: every task's span reaches the exporter although each child exits with os._exit.

    The worker's BatchSpanProcessor waits a minute between exports, so a span is in the
    file only because the child flushed it at worker_process_shutdown.
    """
    with prefork_worker(redis_url, tmp_path, max_tasks_per_child=1, instrument_at=instrument_at) as w:
        app, t = make_app(redis_url, task_default_queue=w.queue)
        with tracer.start_as_current_span("request") as root:
            results = [t.add.delay(i, i) for i in range(8)]
        assert [r.get(timeout=60) for r in results] == [2 * i for i in range(8)]
        spans = w.wait_spans(lambda s: s if all(consumer_for(s, r.id) for r in results) else None)
        for r in results:
            consumer = consumer_for(spans, r.id)
            producer = wait_for(lambda ps, r=r: one(ps, r.id, P))
            assert consumer["trace_id"] == hexid(trace_id(root), 32)
            assert consumer["parent_id"] == hexid(span_id(producer), 16)
            body = [s for s in spans if s["name"] == "add-body" and s["parent_id"] == consumer["span_id"]]
            assert len(body) == 1
        assert len({s["pid"] for s in spans if s["kind"] == "CONSUMER"}) == 8


def header_spans(spans):
    return [s for s in spans if s["kind"] == "CONSUMER" and s["name"] == "process t.add"]


def test_chord_across_children_links_body_to_every_header(redis_url, tmp_path, exporter, tracer, producer_side):
    """Chord headers run in six different child processes; the body, sent by the last, links to all six."""
    with prefork_worker(redis_url, tmp_path, max_tasks_per_child=1) as w:
        app, t = make_app(redis_url, task_default_queue=w.queue)
        with tracer.start_as_current_span("request") as root:
            result = chord([t.add.s(i, i) for i in range(6)], t.collect.s()).apply_async()
        assert result.get(timeout=60) == 30
        spans = w.wait_spans(lambda s: s if consumer_for(s, result.id) and len(header_spans(s)) == 6 else None)
    body = consumer_for(spans, result.id)
    headers = header_spans(spans)
    assert len(headers) == 6 and len({s["pid"] for s in headers}) == 6
    assert body["trace_id"] == hexid(trace_id(root), 32)
    assert sorted(body["links"]) == sorted(s["span_id"] for s in headers)


def test_prefork_outcomes_and_no_context_leak(redis_url, tmp_path, exporter, tracer, producer_side):
    """One long-lived child: a traced task, then untraced ones start new traces; failures and Task.throws are told apart."""
    with prefork_worker(redis_url, tmp_path, concurrency=1) as w:
        app, t = make_app(redis_url, task_default_queue=w.queue)
        with tracer.start_as_current_span("request") as root:
            traced = t.whoami.delay()
            failed = t.fail.delay()
            expected = t.expected.delay()
        assert traced.get(timeout=60)["trace_id"] == hexid(trace_id(root), 32)
        raw_ids = [publish_raw(app, "t.whoami", queue=w.queue) for _ in range(3)]
        seen = [app.AsyncResult(i).get(timeout=60) for i in raw_ids]
        for result in (failed, expected):
            with pytest.raises(Exception):
                result.get(timeout=60)
        w.stop()  # the child flushes on its way out
        spans = w.spans()
    for task_id, body_view in zip(raw_ids, seen):
        span = consumer_for(spans, task_id)
        assert span["parent_id"] is None
        assert body_view["trace_id"] == span["trace_id"] != hexid(trace_id(root), 32)
    assert consumer_for(spans, failed.id)["status"] == "ERROR"
    assert consumer_for(spans, failed.id)["attributes"]["error.type"] == "ValueError"
    assert consumer_for(spans, expected.id)["status"] != "ERROR"
    assert consumer_for(spans, expected.id)["attributes"]["celery.task.state"] == "FAILURE"


def test_countdown_keeps_the_trace_and_queue_time_starts_at_the_eta(redis_url, tmp_path, exporter, tracer, producer_side):
    """A task with a countdown is in the caller's trace; its time in queue excludes the countdown.

    (A subprocess worker: Celery 5.3's in-process test worker runs no ETA task once an
    earlier one has stopped in the same process.)
    """
    with prefork_worker(redis_url, tmp_path, concurrency=1) as w:
        app, t = make_app(redis_url, task_default_queue=w.queue)
        with tracer.start_as_current_span("request") as root:
            delayed = t.add.apply_async((1, 1), countdown=2)
        assert delayed.get(timeout=60) == 2
        w.stop()
        spans = w.spans()
    producer = wait_for(lambda ps: one(ps, delayed.id, P))
    consumer = consumer_for(spans, delayed.id)
    assert consumer["trace_id"] == hexid(trace_id(root), 32)
    assert consumer["parent_id"] == hexid(span_id(producer), 16)
    assert consumer["attributes"]["celery.task.eta"]
    assert 0 <= consumer["attributes"]["celery.message.queue_time"] < 1.5
