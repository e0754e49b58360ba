"""A delivery the broker marks as redelivered says so (issue 18, item 2): ``celery.delivery.redelivered``.

On the CONSUMER span (the pool child's, and the one the main process emits for a lost
delivery) and on the delivery metrics' points, only when true: a first delivery's
series keep their attributes. Real brokers, both ways a message comes back: the worker
holding it unacknowledged vanishes whole (RabbitMQ requeues at the connection's close;
kombu's Redis transport restores it after ``visibility_timeout``), and Celery rejects
a lost delivery with requeue (acks_late + reject_on_worker_lost).
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from typing import Any

import psutil
import pytest
from tests.conftest import make_app
from tests.support.metric_file import latest
from tests.support.prefork import prefork_worker

CONSUMED = "messaging.client.consumed.messages"
DURATION = "messaging.process.duration"
QUEUE_TIME = "celery.message.queue_time"
SCOPE = "otel_celery_headers"
REDELIVERED = "celery.delivery.redelivered"
LOST = "billiard.exceptions.WorkerLostError"
FAST_SPANS = {"SPAN_DELAY_MS": "200"}


def series(rows: list[dict[str, Any]], name: str) -> list[tuple[dict[str, Any], float]]:
    """(attributes, count or value) of each stream of ``name``: its latest point."""
    return [(row["attributes"], row["count"] if row["kind"] == "histogram" else row["value"])
            for row in latest(rows).values() if row["scope"] == SCOPE and row["name"] == name]


def wait_started(app: Any, task_id: str, log: Any) -> None:
    """Until t.hold_once's body has counted its first delivery (its Redis INCR): a worker
    killed earlier, with the task accepted but not yet counting, would leave the next
    worker a first delivery."""
    client = app.backend.client
    deadline = time.monotonic() + 30
    while client.get(f"test-hold-once:{task_id}") != b"1":
        assert time.monotonic() < deadline, f"not started; log:\n{log()[-2000:]}"
        time.sleep(0.05)


def kill_whole(proc: Any) -> None:
    """SIGKILL a worker's main process and its pool children: nobody acks or rejects."""
    family = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
    for p in family:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=30)


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_a_message_left_unacked_by_a_killed_worker_is_redelivered(
    broker, redis_url, rabbitmq_url, tmp_path, producer_side
):
    """Worker A takes an acks_late message and is SIGKILLed whole; worker B, on the same
    queue, runs it: B's one CONSUMER span and its three metric series say redelivered,
    with the attributes a first delivery has plus that one."""
    url = redis_url if broker == "redis" else rabbitmq_url
    env = {**FAST_SPANS, "RESULT_BACKEND": redis_url}
    app, t = make_app(url, backend=redis_url)
    with prefork_worker(url, tmp_path, concurrency=1, env=env) as a:
        a.wait_ready(app)
        result = t.hold_once.apply_async((120,), queue=a.queue)
        wait_started(app, result.id, a.log)
        kill_whole(a.proc)
    # kombu's Redis transport restores a message unacknowledged for longer than
    # visibility_timeout when a consumer starts polling (QoS.restore_visible): B's is
    # 1 s, and the message is older by the time B polls. RabbitMQ requeued it at the
    # close of A's connection.
    b_env = {**env, "VISIBILITY_TIMEOUT": "1"}
    with prefork_worker(url, tmp_path, concurrency=1, metrics=True, env=b_env, queue=a.queue) as b:
        common = {
            "messaging.system": broker,
            "messaging.operation.name": "process",
            "celery.task.name": "t.hold_once",
            "messaging.destination.name": a.queue,
            REDELIVERED: True,
        }
        done = {**common, "celery.task.state": "SUCCESS"}
        expected = {CONSUMED: [(done, 1)], DURATION: [(done, 1)], QUEUE_TIME: [(common, 1)]}

        def exported() -> dict[str, list[tuple[dict[str, Any], float]]]:
            rows = b.metric_points()
            return {name: series(rows, name) for name in expected}

        # Waited for on B's exports, not with result.get(): this process's result
        # subscription was made while A ran, and a plain read of the result is enough.
        deadline = time.monotonic() + 60
        while exported() != expected:
            assert time.monotonic() < deadline, (exported(), b.log()[-2000:])
            time.sleep(0.2)
        assert app.backend.get_task_meta(result.id)["result"] == 2
        (span,) = b.wait_spans(lambda s: [x for x in s if x["kind"] == "CONSUMER"
                                          and x["attributes"].get("messaging.message.id") == result.id])
        time.sleep(1.2)  # two more exports: a second count or span would show
        assert exported() == expected
        assert [x for x in b.spans() if x["kind"] == "CONSUMER"] == [span]
    assert span["attributes"][REDELIVERED] is True
    assert span["attributes"]["messaging.destination.name"] == a.queue
    assert span["attributes"]["celery.task.state"] == "SUCCESS"


def consumed_by_redelivery(rows: list[dict[str, Any]], metric: str) -> Counter[tuple[str, str | None, Any]]:
    """(state, error.type, redelivered attribute or None) -> count, t.die_twice only."""
    found: Counter[tuple[str, str | None, Any]] = Counter()
    for row in latest(rows).values():
        a = row["attributes"]
        if row["scope"] != SCOPE or row["name"] != metric or a["celery.task.name"] != "t.die_twice":
            continue
        key = (a.get("celery.task.state", ""), a.get("error.type"), a.get(REDELIVERED))
        found[key] += row["count"] if row["kind"] == "histogram" else row["value"]
    return found


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_a_requeued_lost_delivery_comes_back_redelivered(broker, redis_url, rabbitmq_url, tmp_path, producer_side):
    """A pool child dies on deliveries 1 and 2 (acks_late + reject_on_worker_lost: Celery
    rejects with requeue); delivery 3 succeeds. The main process's span for delivery 1
    has no redelivered attribute, delivery 2's and the child's span of delivery 3 have
    it; the metric series split the same way."""
    url = redis_url if broker == "redis" else rabbitmq_url
    env = {**FAST_SPANS, "RESULT_BACKEND": redis_url}
    with prefork_worker(url, tmp_path, concurrency=2, metrics=True, env=env) as w:
        app, t = make_app(url, backend=redis_url, task_default_queue=w.queue)
        w.wait_ready(app)
        result = t.die_twice.delay()
        assert result.get(timeout=90) == 3
        expected = {("REQUEUED", LOST, None): 1, ("REQUEUED", LOST, True): 1, ("SUCCESS", None, True): 1}
        deadline = time.monotonic() + 30
        while consumed_by_redelivery(w.metric_points(), CONSUMED) != expected:
            assert time.monotonic() < deadline, consumed_by_redelivery(w.metric_points(), CONSUMED)
            time.sleep(0.2)
        time.sleep(1.2)  # two more exports: a delivery counted twice would show
        assert consumed_by_redelivery(w.metric_points(), CONSUMED) == expected
        assert consumed_by_redelivery(w.metric_points(), DURATION) == expected
        # Time in queue: recorded when a pool process accepts the delivery (no state).
        assert consumed_by_redelivery(w.metric_points(), QUEUE_TIME) == {
            ("", None, None): 1, ("", None, True): 2,
        }
        spans = w.wait_spans(lambda s: (lambda f: f if len(f) == 3 else None)(
            [x for x in s if x["kind"] == "CONSUMER"
             and x["attributes"].get("messaging.message.id") == result.id]))
    first, second, third = sorted(spans, key=lambda s: s["start_ns"])
    assert [s["attributes"]["celery.task.state"] for s in (first, second, third)] == [
        "REQUEUED", "REQUEUED", "SUCCESS"]
    assert REDELIVERED not in first["attributes"]
    assert second["attributes"][REDELIVERED] is True
    assert third["attributes"][REDELIVERED] is True
