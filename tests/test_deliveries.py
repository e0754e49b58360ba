"""Every worker delivery counted once, with its outcome, by one writer (issue 10, items 1 to 4).

Real prefork workers (tests/support/prefork.py) export their metrics every 500 ms as
JSON lines with the writing pid; the counts below are exact. One Redis worker serves
the outcome scenarios in turn: each test measures what its own messages added.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from celery.app.task import Task
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded, WorkerLostError
from opentelemetry.trace import SpanKind

from tests.conftest import make_app, wait_for
from tests.support.metric_file import latest, writers
from tests.support.prefork import prefork_worker
from tests.support.spans import one, span_id, trace_id

CONSUMED = "messaging.client.consumed.messages"
DURATION = "messaging.process.duration"
QUEUE_TIME = "celery.message.queue_time"
SCOPE = "otel_celery_headers"
TLE = "billiard.exceptions.TimeLimitExceeded"
LOST = "billiard.exceptions.WorkerLostError"
# Spans of the main process must reach the file while the worker runs.
FAST_SPANS = {"SPAN_DELAY_MS": "200"}


def outcomes(rows: list[dict[str, Any]], metric: str = CONSUMED) -> Counter[tuple[str, str, str | None]]:
    """(task, state, error.type) -> count, from each stream's latest (cumulative) point."""
    found: Counter[tuple[str, str, str | None]] = Counter()
    for row in latest(rows).values():
        if row["scope"] != SCOPE or row["name"] != metric:
            continue
        a = row["attributes"]
        key = (a["celery.task.name"], a["celery.task.state"], a.get("error.type"))
        found[key] += row["count"] if row["kind"] == "histogram" else row["value"]
    return found


def settle(w: Any, before: Counter, expected: int, metric: str = CONSUMED, timeout: float = 60) -> Counter:
    """What ``metric`` gained since ``before``, once it has gained ``expected``, read
    again two exports later (so a delivery counted twice would show)."""
    deadline = time.monotonic() + timeout
    while sum((outcomes(w.metric_points(), metric) - before).values()) < expected:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{metric}: {outcomes(w.metric_points(), metric) - before}; log:\n{w.log()[-3000:]}")
        time.sleep(0.2)
    time.sleep(1.2)
    return outcomes(w.metric_points(), metric) - before


def consumers(spans: list[dict[str, Any]], task_id: str) -> list[dict[str, Any]]:
    return [s for s in spans if s["kind"] == "CONSUMER"
            and s["attributes"].get("messaging.message.id") == task_id]


def hexid(value: int, width: int) -> str:
    return format(value, f"0{width}x")


@pytest.fixture(scope="module")
def redis_worker(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    tmp = tmp_path_factory.mktemp("deliveries")
    with prefork_worker(redis_url, tmp, concurrency=2, metrics=True, env=FAST_SPANS) as w:
        app, t = make_app(redis_url, task_default_queue=w.queue)
        w.wait_ready(app)
        yield SimpleNamespace(w=w, app=app, t=t)


def wait_revoked(result: Any) -> None:
    deadline = time.monotonic() + 30
    while result.state != "REVOKED":
        assert time.monotonic() < deadline, result.state
        time.sleep(0.1)


def test_the_issues_eight_messages_are_eight_deliveries(redis_worker, exporter, tracer, producer_side):
    """3 succeed, 1 ValueError, 1 hard time limit, 1 os._exit, 1 revoked before start, 1 unknown task: consumed == 8, each with its outcome; 8 spans."""
    w, app, t = redis_worker.w, redis_worker.app, redis_worker.t
    before, before_duration = outcomes(w.metric_points()), outcomes(w.metric_points(), DURATION)
    with tracer.start_as_current_span("request") as root:
        ok = [t.add.delay(i, i) for i in range(3)]
        failed = t.fail.delay()
        revoked = t.add.apply_async((1, 1), countdown=3)
        unknown = app.send_task("t.no_such_task", args=(1,), queue=w.queue)
        app.control.revoke(revoked.id)
        assert [r.get(timeout=60) for r in ok] == [0, 2, 4]
        with pytest.raises(ValueError):
            failed.get(timeout=60)
        # A child exports its finished spans within child_flush_interval_ms (200 ms) of
        # a task's end; one killed sooner takes them along (docs/explanation/reliability.md, "Nothing vanishes").
        time.sleep(0.6)
        limited = t.sleep.apply_async((30,), time_limit=1)
        lost = t.die.delay()
    for result, error in ((limited, TimeLimitExceeded), (lost, WorkerLostError)):
        with pytest.raises(error):
            result.get(timeout=60)
    wait_revoked(revoked)

    consumed = settle(w, before, 8)
    assert consumed == {
        ("t.add", "SUCCESS", None): 3,
        ("t.fail", "FAILURE", "ValueError"): 1,
        ("t.sleep", "FAILURE", TLE): 1,
        ("t.die", "FAILURE", LOST): 1,
        ("t.add", "REVOKED", None): 1,
        ("t.no_such_task", "UNKNOWN", "celery.exceptions.NotRegistered"): 1,
    }
    assert sum(consumed.values()) == 8
    # A duration for each delivery that started; none for those that never did.
    assert settle(w, before_duration, 6, DURATION) == {
        ("t.add", "SUCCESS", None): 3,
        ("t.fail", "FAILURE", "ValueError"): 1,
        ("t.sleep", "FAILURE", TLE): 1,
        ("t.die", "FAILURE", LOST): 1,
    }

    ids = [r.id for r in (*ok, failed, limited, lost, revoked, unknown)]
    w.wait_spans(lambda s: all(consumers(s, i) for i in ids))
    time.sleep(0.5)  # one more span export: a second span for a delivery would show
    spans = w.spans()
    assert sorted(len(consumers(spans, i)) for i in ids) == [1] * 8
    states = Counter(consumers(spans, i)[0]["attributes"].get("celery.task.state") for i in ids)
    assert states == {"SUCCESS": 3, "FAILURE": 3, "REVOKED": 1, "UNKNOWN": 1}
    for i in ids:
        (span,) = consumers(spans, i)
        producer = wait_for(lambda ps, i=i: one(ps, i, SpanKind.PRODUCER))
        assert span["trace_id"] == hexid(trace_id(root), 32)
        assert span["parent_id"] == hexid(span_id(producer), 16)


def test_a_child_lost_after_its_span_is_one_span_and_one_count(redis_worker, tracer, producer_side):
    """The child ends and flushes the task's span, then dies before the main process reads the result; Celery reports WorkerLostError: the span is the child's, the only one; the count is one, WorkerLostError."""
    w, t = redis_worker.w, redis_worker.t
    before, before_duration = outcomes(w.metric_points()), outcomes(w.metric_points(), DURATION)
    with tracer.start_as_current_span("request") as root:
        result = t.finish_then_die.delay()
    assert settle(w, before, 1) == {("t.finish_then_die", "FAILURE", LOST): 1}
    assert settle(w, before_duration, 1, DURATION) == {("t.finish_then_die", "FAILURE", LOST): 1}
    w.wait_spans(lambda s: consumers(s, result.id))
    time.sleep(0.5)  # one more export of the main process's spans: a second would show
    (span,) = consumers(w.spans(), result.id)
    assert span["attributes"]["celery.task.state"] == "SUCCESS"
    assert span["status"] == "UNSET"
    assert span["pid"] != w.proc.pid  # the pool child's span, not one from the main process
    assert span["trace_id"] == hexid(trace_id(root), 32)


def wait_active(app: Any, w: Any, task_id: str) -> None:
    """Until a pool process runs the task (revoke(terminate=True) then terminates it)."""
    deadline = time.monotonic() + 30
    while True:
        active = app.control.inspect(destination=[f"{w.queue}@localhost"], timeout=1).active() or {}
        if any(task["id"] == task_id for tasks in active.values() for task in tasks):
            return
        assert time.monotonic() < deadline, f"not started; log:\n{w.log()[-2000:]}"
        time.sleep(0.2)


def test_outcomes_inside_the_task_are_counted_once_each(redis_worker, producer_side):
    """Ignore, Reject, retry (2 deliveries), Task.throws, soft time limit, terminated, expired: one count per delivery."""
    w, app, t = redis_worker.w, redis_worker.app, redis_worker.t
    before = outcomes(w.metric_points())
    running = t.sleep.delay(30)
    ignored, rejected = t.ignore_me.delay(), t.reject_me.delay()
    retried, expected = t.retry_once.delay(), t.expected.delay()
    soft = t.sleep.apply_async((5,), soft_time_limit=0.5)
    expired = t.add.apply_async((1, 1), countdown=2, expires=1)
    assert retried.get(timeout=60) == 1
    with pytest.raises(KeyError):
        expected.get(timeout=60)
    with pytest.raises(SoftTimeLimitExceeded):
        soft.get(timeout=60)
    wait_active(app, w, running.id)
    app.control.revoke(running.id, terminate=True)
    wait_revoked(running)
    wait_revoked(expired)

    assert settle(w, before, 8) == {
        ("t.ignore_me", "IGNORED", None): 1,
        ("t.reject_me", "REJECTED", None): 1,
        ("t.retry_once", "RETRY", None): 1,
        ("t.retry_once", "SUCCESS", None): 1,
        # Task.throws: a failure, expected; error.type as on its span.
        ("t.expected", "FAILURE", "KeyError"): 1,
        ("t.sleep", "FAILURE", "billiard.exceptions.SoftTimeLimitExceeded"): 1,
        ("t.sleep", "REVOKED", None): 1,  # terminated while running
        ("t.add", "REVOKED", None): 1,  # expired
    }
    assert ignored.id and rejected.id


def requeued_twice(w: Any, app: Any, t: Any, tracer: Any) -> None:
    """A task whose pool child dies on deliveries 1 and 2 (acks_late + reject_on_worker_lost): 3 spans, 3 counts."""
    before = outcomes(w.metric_points())
    with tracer.start_as_current_span("request") as root:
        result = t.die_twice.delay()
    assert result.get(timeout=90) == 3
    assert settle(w, before, 3) == {
        ("t.die_twice", "REQUEUED", LOST): 2,
        ("t.die_twice", "SUCCESS", None): 1,
    }
    spans = w.wait_spans(lambda s: len(consumers(s, result.id)) >= 3 and s)
    time.sleep(0.5)
    spans = [s for s in consumers(w.spans(), result.id) if s["trace_id"] == hexid(trace_id(root), 32)]
    assert len(spans) == 3
    lost = [s for s in spans if s["status"] == "ERROR"]
    assert len(lost) == 2
    for span in lost:
        assert span["attributes"]["error.type"] == LOST
        assert span["attributes"]["celery.delivery.requeued"] is True
        assert span["attributes"]["celery.task.state"] == "REQUEUED"
    (ran,) = [s for s in spans if s["status"] != "ERROR"]
    assert ran["attributes"]["celery.task.state"] == "SUCCESS"
    producer = wait_for(lambda ps: one(ps, result.id, SpanKind.PRODUCER))
    assert {s["parent_id"] for s in spans} == {hexid(span_id(producer), 16)}


def test_a_delivery_lost_and_requeued_is_seen_each_time_redis(redis_worker, tracer, producer_side):
    """Redis: two lost deliveries, two ERROR spans (requeued) and one that ran; consumed counts 3."""
    requeued_twice(redis_worker.w, redis_worker.app, redis_worker.t, tracer)


def test_a_delivery_lost_and_requeued_is_seen_each_time_rabbitmq(rabbitmq_url, redis_url, tmp_path, tracer, producer_side):
    """RabbitMQ (the broker requeues the rejected message itself): the same 3 spans and 3 counts."""
    env = {**FAST_SPANS, "RESULT_BACKEND": redis_url}
    with prefork_worker(rabbitmq_url, tmp_path, concurrency=2, metrics=True, env=env) as w:
        app, t = make_app(rabbitmq_url, backend=redis_url, task_default_queue=w.queue)
        w.wait_ready(app)
        requeued_twice(w, app, t, tracer)


def test_retry_on_worker_lost_is_a_retry_per_lost_delivery(redis_worker, tracer, producer_side):
    """Celery 5.7 retry_on_worker_lost: each lost delivery is a RETRY (WorkerLostError) with its own ERROR span, all in the caller's trace. Celery 5.3 has no such option: one lost delivery, FAILURE."""
    w, t = redis_worker.w, redis_worker.t
    before = outcomes(w.metric_points())
    with tracer.start_as_current_span("request") as root:
        result = t.die_twice_retry.delay()
    if not hasattr(Task, "retry_on_worker_lost"):  # Celery < 5.7
        with pytest.raises(WorkerLostError):
            result.get(timeout=60)
        assert settle(w, before, 1) == {("t.die_twice_retry", "FAILURE", LOST): 1}
        return
    assert result.get(timeout=90) == 3
    assert settle(w, before, 3) == {
        ("t.die_twice_retry", "RETRY", LOST): 2,
        ("t.die_twice_retry", "SUCCESS", None): 1,
    }
    root_trace = hexid(trace_id(root), 32)
    w.wait_spans(lambda s: len(consumers(s, result.id)) >= 3)
    time.sleep(0.5)
    spans = consumers(w.spans(), result.id)
    assert len(spans) == 3 and {s["trace_id"] for s in spans} == {root_trace}
    assert sorted((s["status"], s["attributes"]["celery.task.state"]) for s in spans) == [
        ("ERROR", "RETRY"), ("ERROR", "RETRY"), ("UNSET", "SUCCESS")]


def test_exemplars_open_the_tasks_trace(redis_worker, tracer, producer_side):
    """Duration and queue-time points carry an exemplar whose trace id is the task's trace."""
    w, t = redis_worker.w, redis_worker.t
    with tracer.start_as_current_span("request") as root:
        result = t.collect.delay([1, 2])
    assert result.get(timeout=60) == 3
    wanted = hexid(trace_id(root), 32)

    def exemplar_traces(name: str) -> set[str]:
        return {e["trace_id"] for row in w.metric_points()
                if row["name"] == name and row["attributes"].get("celery.task.name") == "t.collect"
                for e in row["exemplars"]}

    deadline = time.monotonic() + 30
    while not (wanted in exemplar_traces(DURATION) and wanted in exemplar_traces(QUEUE_TIME)):
        assert time.monotonic() < deadline, (exemplar_traces(DURATION), exemplar_traces(QUEUE_TIME))
        time.sleep(0.2)
    # The exemplar filter is the SDK's default (trace_based) on every SDK we support:
    # opentelemetry-sdk 1.28 (the oldest) already samples exemplars.
    assert exemplar_traces(DURATION) == exemplar_traces(QUEUE_TIME) == {wanted}


def test_a_call_under_trace_shape_link_gives_no_exemplar(redis_worker, tracer, producer_side):
    """A task published under ``with trace_shape("link")`` starts a trace of its own,
    which the main process cannot name: its duration and queue-time points carry no
    exemplar, none into the caller's trace."""
    from otel_celery_headers import trace_shape

    w, t = redis_worker.w, redis_worker.t
    before = outcomes(w.metric_points(), DURATION)
    with tracer.start_as_current_span("request"):
        with trace_shape("link"):
            result = t.whoami.delay()
    result.get(timeout=60)
    assert settle(w, before, 1, DURATION) == {("t.whoami", "SUCCESS", None): 1}
    rows = [row for row in w.metric_points() if row["name"] in (DURATION, QUEUE_TIME)
            and row["attributes"].get("celery.task.name") == "t.whoami"]
    assert {row["name"] for row in rows} == {DURATION, QUEUE_TIME}
    assert [e for row in rows for e in row["exemplars"]] == []


def streams(w: Any) -> tuple[set[tuple[str, str]], dict[Any, set[int]], set[str]]:
    """Our delivery streams (name, attributes without the per-worker queue), their writers, resources."""
    import json

    rows = [r for r in w.metric_points() if r["scope"] == SCOPE and r["name"] in (CONSUMED, DURATION, QUEUE_TIME)]
    keys = set()
    for row in rows:
        attributes = {k: v for k, v in row["attributes"].items() if k != "messaging.destination.name"}
        keys.add((row["name"], json.dumps(attributes, sort_keys=True)))
    return keys, writers(rows), {json.dumps(r["resource"], sort_keys=True) for r in rows}


def test_streams_do_not_grow_with_child_recycles(redis_url, tmp_path, producer_side):
    """20 tasks under --max-tasks-per-child 1 make the same streams as without; each stream has one writer, the main process."""
    measured = {}
    with prefork_worker(redis_url, tmp_path, concurrency=2, metrics=True, max_tasks_per_child=1) as recycled, \
            prefork_worker(redis_url, tmp_path, concurrency=2, metrics=True) as steady:
        for name, w in (("recycled", recycled), ("steady", steady)):
            app, t = make_app(redis_url, task_default_queue=w.queue)
            w.wait_ready(app)
            results = [t.add.delay(i, 1) for i in range(20)]
            assert [r.get(timeout=60) for r in results] == [i + 1 for i in range(20)]
        for name, w in (("recycled", recycled), ("steady", steady)):
            assert settle(w, Counter(), 20) == {("t.add", "SUCCESS", None): 20}
            assert settle(w, Counter(), 20, DURATION) == {("t.add", "SUCCESS", None): 20}
            measured[name] = (*streams(w), w.proc.pid)
    recycled_keys, recycled_writers, recycled_resources, recycled_pid = measured["recycled"]
    steady_keys, steady_writers, steady_resources, steady_pid = measured["steady"]
    assert recycled_keys == steady_keys
    assert {k[0] for k in steady_keys} == {CONSUMED, DURATION, QUEUE_TIME}
    assert len(recycled_writers) == len(steady_writers) == 3
    assert set(map(frozenset, recycled_writers.values())) == {frozenset({recycled_pid})}
    assert set(map(frozenset, steady_writers.values())) == {frozenset({steady_pid})}
    assert len(recycled_resources) == len(steady_resources) == 1


def test_a_forked_child_exports_only_what_it_records(tmp_path):
    """After fork, our instruments' inherited points are gone in the child (the user's stay), and the child's first measurement does not wait for a storage lock held at the fork."""
    import json
    import os
    import threading

    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from otel_celery_headers import forkmetrics
    from otel_celery_headers.metrics import Instruments

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    ours = Instruments.create(provider.get_meter(SCOPE))
    users = provider.get_meter("user").create_counter("user.count")
    ours.consumed.add(5, {"k": "v"})
    users.add(2)

    def values() -> dict[str, list[float]]:
        return {m.name: [p.value for p in m.data.data_points]
                for rm in reader.get_metrics_data().resource_metrics
                for sm in rm.scope_metrics for m in sm.metrics}

    out = tmp_path / "child.json"
    forkmetrics.forget_in_children(ours.all())
    (storage,) = provider._measurement_consumer._reader_storages.values()
    # Another thread holds the storage's lock at the fork, as the reader thread does
    # while it collects.
    held, done = threading.Event(), threading.Event()

    def collector() -> None:
        with storage._lock:
            held.set()
            done.wait(30)

    holder = threading.Thread(target=collector, daemon=True)
    holder.start()
    assert held.wait(10)
    try:
        pid = os.fork()
        if pid == 0:  # the child: one measurement, then what it would export
            try:
                ours.consumed.add(1, {"k": "v"})
                out.write_text(json.dumps(values()))
            finally:
                os._exit(0)
        deadline = time.monotonic() + 20
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                raise AssertionError("the child froze on a lock held at the fork")
            time.sleep(0.05)
    finally:
        done.set()
        holder.join(10)
        forkmetrics.stop()
    assert json.loads(out.read_text()) == {CONSUMED: [1], "user.count": [2]}
    assert values() == {CONSUMED: [5], "user.count": [2]}
