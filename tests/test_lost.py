"""Tasks that never reach task_postrun still appear in the caller's trace, once."""

from __future__ import annotations

import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded, WorkerLostError
from opentelemetry import propagate
from opentelemetry.trace import SpanKind, StatusCode

from tests.conftest import instrument, make_app, wait_for, worker
from tests.support.metric_file import latest
from tests.support.prefork import prefork_worker
from tests.support.spans import attr, one, parent_id, span_id, trace_id

P, C = SpanKind.PRODUCER, SpanKind.CONSUMER


def hexid(value: int, width: int) -> str:
    return format(value, f"0{width}x")


def consumers(spans, task_id):
    return [s for s in spans if s["kind"] == "CONSUMER"
            and s["attributes"].get("messaging.message.id") == task_id]



def test_prefork_hard_time_limit_worker_lost_and_terminate(redis_url, tmp_path, exporter, tracer, producer_side):
    """Hard time limit and a vanished child: one ERROR span each; terminated: one REVOKED span; a task finished before the kill keeps its span."""
    with prefork_worker(redis_url, tmp_path, concurrency=2) as w:
        app, t = make_app(redis_url, task_default_queue=w.queue)
        w.wait_ready(app)
        with tracer.start_as_current_span("request") as root:
            before = t.add.delay(1, 1)
            assert before.get(timeout=60) == 2
            # The promise is "exported within child_flush_interval_ms (200 ms) of the
            # task's end": a child killed after that takes no finished span with it.
            time.sleep(0.6)
            limited = t.sleep.apply_async((30,), time_limit=1)
            lost = t.die.delay()
            running = t.sleep.delay(30)
        with pytest.raises(TimeLimitExceeded):
            limited.get(timeout=60)
        with pytest.raises(WorkerLostError):
            lost.get(timeout=60)
        time.sleep(1.5)  # let the sleeping task start before terminating it
        app.control.revoke(running.id, terminate=True)
        deadline = time.monotonic() + 30
        while running.state != "REVOKED" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert running.state == "REVOKED"
        w.stop()  # the main process exports its spans as it exits
        spans = w.spans()

    root_trace = hexid(trace_id(root), 32)
    producers = {task_id: wait_for(lambda ps, i=task_id: one(ps, i, P))
                 for task_id in (before.id, limited.id, lost.id, running.id)}

    (limited_span,) = consumers(spans, limited.id)
    assert limited_span["status"] == "ERROR"
    assert limited_span["attributes"]["error.type"] == "billiard.exceptions.TimeLimitExceeded"
    (lost_span,) = consumers(spans, lost.id)
    assert lost_span["status"] == "ERROR"
    assert lost_span["attributes"]["error.type"] == "billiard.exceptions.WorkerLostError"
    (terminated,) = consumers(spans, running.id)
    assert terminated["status"] != "ERROR"
    assert terminated["attributes"]["celery.task.state"] == "REVOKED"
    assert terminated["attributes"]["celery.task.revoked.reason"] == "terminated"
    for task_id, span in ((limited.id, limited_span), (lost.id, lost_span), (running.id, terminated)):
        assert span["trace_id"] == root_trace
        assert span["parent_id"] == hexid(span_id(producers[task_id]), 16)
    (finished,) = consumers(spans, before.id)
    assert finished["trace_id"] == root_trace and finished["status"] != "ERROR"


def test_prefork_reject_is_one_span_and_one_count_per_delivery(redis_url, tmp_path, producer_side):
    """Reject(requeue=False) in a pool child (Celery 5.7 also sends task_failure for it from
    the main process): one CONSUMER span and one consumed count, REJECTED. Reject(requeue=True):
    REJECTED then, redelivered, SUCCESS; one span and one count each."""
    with prefork_worker(redis_url, tmp_path, concurrency=2, metrics=True,
                        env={"SPAN_DELAY_MS": "200"}) as w:
        app, t = make_app(redis_url, task_default_queue=w.queue)
        w.wait_ready(app)
        rejected = t.reject_me.delay()
        requeued = t.reject_requeue_once.delay()
        assert requeued.get(timeout=60) == 2
        expected = {
            ("t.reject_me", "REJECTED"): 1,
            ("t.reject_requeue_once", "REJECTED"): 1,
            ("t.reject_requeue_once", "SUCCESS"): 1,
        }
        deadline = time.monotonic() + 30
        while consumed(w.metric_points()) != expected:
            assert time.monotonic() < deadline, (consumed(w.metric_points()), w.log()[-2000:])
            time.sleep(0.2)
        time.sleep(1.2)  # two more exports: a second count for a delivery would show
        assert consumed(w.metric_points()) == expected
        w.stop()  # the main process exports its spans as it exits
        spans = w.spans()
    (span,) = consumers(spans, rejected.id)
    assert span["attributes"]["celery.task.state"] == "REJECTED"
    first, second = sorted(consumers(spans, requeued.id), key=lambda s: s["start_ns"])
    assert [first["attributes"]["celery.task.state"], second["attributes"]["celery.task.state"]] == [
        "REJECTED", "SUCCESS"]
    assert "celery.delivery.redelivered" not in first["attributes"]
    assert second["attributes"]["celery.delivery.redelivered"] is True


def consumed(rows) -> dict[tuple[str, str], float]:
    """(task, state) -> messaging.client.consumed.messages, each stream's latest point."""
    found: dict[tuple[str, str], float] = {}
    for row in latest(rows).values():
        if row["scope"] == "otel_celery_headers" and row["name"] == "messaging.client.consumed.messages":
            key = (row["attributes"]["celery.task.name"], row["attributes"]["celery.task.state"])
            found[key] = found.get(key, 0) + row["value"]
    return found


@pytest.fixture(scope="module")
def solo(redis_url: str) -> Iterator[SimpleNamespace]:
    instrumentor = instrument()
    app, tasks = make_app(redis_url, task_default_queue="lost-solo")
    try:
        with worker(app):
            yield SimpleNamespace(app=app, t=tasks)
    finally:
        instrumentor.uninstrument()


def test_revoked_before_start_and_expired_are_revoked_spans(redis_url, tmp_path, exporter, tracer, producer_side):
    """Revoked while waiting for its eta, or expired before it ran: one span each, not an error, in the caller's trace.

    (A subprocess worker: Celery 5.3's in-process test worker runs no ETA task once an
    earlier one has stopped in the same process.)
    """
    with prefork_worker(redis_url, tmp_path, concurrency=1) as w:
        app, t = make_app(redis_url, task_default_queue=w.queue)
        w.wait_ready(app)
        with tracer.start_as_current_span("request") as root:
            revoked = t.add.apply_async((1, 1), countdown=2)
            expired = t.add.apply_async((1, 1), countdown=2, expires=1)
        app.control.revoke(revoked.id)
        deadline = time.monotonic() + 30
        while {revoked.state, expired.state} != {"REVOKED"} and time.monotonic() < deadline:
            time.sleep(0.1)
        assert revoked.state == expired.state == "REVOKED"
        w.stop()
        spans = w.spans()
    for result, reason in ((revoked, "revoked"), (expired, "expired")):
        (span,) = consumers(spans, result.id)
        producer = wait_for(lambda ps, r=result: one(ps, r.id, P))
        assert span["attributes"]["celery.task.revoked.reason"] == reason
        assert span["attributes"]["celery.task.state"] == "REVOKED"
        assert span["status"] != "ERROR"
        assert span["trace_id"] == hexid(trace_id(root), 32)
        assert span["parent_id"] == hexid(span_id(producer), 16)


def test_unknown_task_is_an_error_span_in_the_callers_trace(solo, exporter, tracer):
    """send_task to a name no worker knows: an ERROR span under the publish."""
    with tracer.start_as_current_span("request") as root:
        result = solo.app.send_task("t.no_such_task", args=(1,), queue="lost-solo")
    span = wait_for(lambda spans: one(spans, result.id, C), timeout=30)
    assert span.status.status_code == StatusCode.ERROR
    assert attr(span, "celery.task.state") == "UNKNOWN"
    assert trace_id(span) == trace_id(root)
    assert parent_id(span) == span_id(one(exporter.get_finished_spans(), result.id, P))


def test_rejected_message_is_one_error_span(solo, exporter, tracer):
    """A message that is not a Celery task (no task name) is rejected: one ERROR span in its sender's trace, once."""
    with tracer.start_as_current_span("sender") as root:
        headers: dict = {}
        propagate.inject(headers)
        with solo.app.connection_for_write() as conn:
            conn.Producer(serializer="json").publish(
                {"not": "a task"}, routing_key="lost-solo", headers=headers,
                declare=[solo.app.amqp.queues["lost-solo"]],
            )

    def rejected(spans):
        return [s for s in spans if s.kind == C and attr(s, "celery.task.state") == "REJECTED"]

    wait_for(rejected, timeout=30)
    # "Once": the solo worker takes messages in order, so when a task published after the
    # rejected message has a finished span, any second span for the rejection would be
    # there too.
    fence = solo.t.add.delay(0, 0)
    assert fence.get(timeout=30) == 0
    wait_for(lambda spans: one(spans, fence.id, C))
    (span,) = rejected(exporter.get_finished_spans())
    assert span.name == "process unknown"
    assert span.status.status_code == StatusCode.ERROR
    assert attr(span, "error.type") == "ValueError"
    assert attr(span, "celery.task.name") == "unknown"
    assert trace_id(span) == trace_id(root) and parent_id(span) == span_id(root)
    # The message has no task id: the span has no messaging.message.id at all (not "").
    assert "messaging.message.id" not in span.attributes
    assert [e.name for e in span.events] == ["exception"]


def _active_ids(app, worker) -> set[str]:
    """Ids of the tasks the worker reports running in a pool child (time_start set)."""
    replies = app.control.inspect(destination=[f"{worker.queue}@localhost"], timeout=1).active() or {}
    return {task["id"] for tasks in replies.values() for task in tasks if task.get("time_start")}


def test_prefork_terminate_signal_and_soft_time_limit(redis_url, tmp_path, exporter, tracer, producer_side):
    """revoke(terminate=True, signal=...) names the signal on the span; a soft time limit is an ERROR span
    carrying the worker's node name."""
    with prefork_worker(redis_url, tmp_path, concurrency=3) as w:
        app, t = make_app(redis_url, task_default_queue=w.queue)
        w.wait_ready(app)
        with tracer.start_as_current_span("request") as root:
            soft = t.sleep.apply_async((30,), soft_time_limit=1)
            by_term = t.sleep.delay(30)
            by_kill = t.sleep.delay(30)
        # Only a running task is terminated (a reserved one would just be revoked).
        deadline = time.monotonic() + 30
        while not {by_term.id, by_kill.id} <= _active_ids(app, w):
            assert time.monotonic() < deadline, f"tasks never started; log:\n{w.log()[-3000:]}"
            time.sleep(0.1)
        app.control.revoke(by_term.id, terminate=True, signal="SIGTERM")
        app.control.revoke(by_kill.id, terminate=True, signal="SIGKILL")
        with pytest.raises(SoftTimeLimitExceeded):
            soft.get(timeout=60)
        deadline = time.monotonic() + 30
        while {by_term.state, by_kill.state} != {"REVOKED"} and time.monotonic() < deadline:
            time.sleep(0.1)
        assert by_term.state == by_kill.state == "REVOKED"
        w.stop()
        spans = w.spans()

    root_trace = hexid(trace_id(root), 32)
    (soft_span,) = consumers(spans, soft.id)
    assert soft_span["status"] == "ERROR"
    # Celery re-exports billiard's class; error.type names where the class is defined.
    assert soft_span["attributes"]["error.type"] == "billiard.exceptions.SoftTimeLimitExceeded"
    assert soft_span["attributes"]["celery.task.state"] == "FAILURE"
    assert soft_span["trace_id"] == root_trace
    # The node name given with `celery worker --hostname` (prefork.py).
    assert soft_span["attributes"]["celery.worker.hostname"] == f"{w.queue}@localhost"
    for result, signal_name in ((by_term, "SIGTERM"), (by_kill, "SIGKILL")):
        (span,) = consumers(spans, result.id)
        assert span["status"] == "UNSET"
        assert span["attributes"]["celery.task.state"] == "REVOKED"
        assert span["attributes"]["celery.task.revoked.reason"] == "terminated"
        assert span["attributes"]["celery.task.revoked.signal"] == signal_name
        assert span["trace_id"] == root_trace
