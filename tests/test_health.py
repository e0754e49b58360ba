"""Worker and queue health (issue 10, item 5): active, reserved, pool size, queue length.

Real prefork workers (tests/support/prefork.py) export metrics every 500 ms to a file;
OTEL_METRIC_EXPORT_INTERVAL tells our queue-length thread the same interval.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery.contrib.testing.worker import start_worker
from kombu import Connection

from otel_celery_headers import options
from otel_celery_headers.health import POOL_SIZE, QUEUE_LENGTH, TASKS_ACTIVE, TASKS_RESERVED
from otel_celery_headers.queue_length import QueueLengths
from tests.conftest import METRICS, instrument, make_app
from tests.support.prefork import prefork_worker
from tests.support.servers import free_port

HEALTH = (TASKS_ACTIVE, TASKS_RESERVED, POOL_SIZE, QUEUE_LENGTH)
INTERVAL_ENV = {"OTEL_METRIC_EXPORT_INTERVAL": "500"}  # the workers export every 500 ms
WARNING = "cannot read queue lengths from the broker"
# Long enough that the first two tasks still run while we look, short enough that a
# warm shutdown (which waits for them) stays quick.
SLEEP = 6.0


def snapshots(points: list[dict[str, Any]]) -> list[tuple[int, dict[Any, float]]]:
    """Health points per export (one collection shares one timestamp), oldest first.

    Keys: the metric name; for the queue length, (name, queue).
    """
    by_time: dict[int, dict[Any, float]] = {}
    for row in points:
        if row["name"] not in HEALTH:
            continue
        key: Any = row["name"]
        if key == QUEUE_LENGTH:
            key = (QUEUE_LENGTH, row["attributes"]["messaging.destination.name"])
        by_time.setdefault(row["time"], {})[key] = row["value"]
    return sorted(by_time.items())


def wait_snapshot(w: Any, predicate: Callable[[dict[Any, float]], bool], timeout: float = 30) -> dict[Any, float]:
    deadline = time.monotonic() + timeout
    while True:
        for _, snap in reversed(snapshots(w.metric_points())):
            if predicate(snap):
                return snap
        if time.monotonic() > deadline:
            tail = snapshots(w.metric_points())[-3:]
            raise AssertionError(f"no such export; last ones: {tail}\nworker log:\n{w.log()[-3000:]}")
        time.sleep(0.1)


def assert_stopped_at_zero(w: Any) -> None:
    """After the graceful stop: the last export says 0 held, and only the main process wrote."""
    w.stop()
    assert w.proc.returncode == 0, w.log()[-3000:]
    points = [p for p in w.metric_points() if p["name"] in HEALTH]
    assert {p["pid"] for p in points} == {w.proc.pid}
    last = snapshots(points)[-1][1]
    assert (last[TASKS_ACTIVE], last[TASKS_RESERVED], last[POOL_SIZE]) == (0, 0, 0)


@contextmanager
def silent_server() -> Iterator[SimpleNamespace]:
    """A TCP server that accepts connections and never answers (a hung broker)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    server.settimeout(0.1)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield SimpleNamespace(url=f"redis://127.0.0.1:{server.getsockname()[1]}/0", held=held)
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        server.close()


def test_redis_worker_health_with_priority_sub_queues(redis_url, tmp_path):
    """-c 2, 10 long tasks: 2 active, 8 reserved; 5 more, with priorities, wait in kombu's
    priority sub-lists and the queue length counts all 5; 0 once they are gone; 0 held after stop."""
    with prefork_worker(redis_url, tmp_path, concurrency=2, metrics=True, env=INTERVAL_ENV) as w:
        app, t = make_app(redis_url, task_default_queue=w.queue)
        w.wait_ready(app)
        for _ in range(10):
            t.sleep.delay(SLEEP)
        queue = (QUEUE_LENGTH, w.queue)
        wait_snapshot(w, lambda s: (s.get(TASKS_ACTIVE), s.get(TASKS_RESERVED), s.get(POOL_SIZE), s.get(queue))
                      == (2, 8, 2, 0))
        for priority in (0, 3, 6, 9, 9):
            t.sleep.apply_async((SLEEP,), priority=priority)
        client = redis.Redis.from_url(redis_url)
        keys = [w.queue] + [f"{w.queue}\x06\x16{step}" for step in (3, 6, 9)]
        assert [client.llen(key) for key in keys] == [1, 1, 1, 2]
        wait_snapshot(w, lambda s: (s.get(TASKS_ACTIVE), s.get(TASKS_RESERVED), s.get(queue)) == (2, 8, 5))
        client.delete(*keys)
        wait_snapshot(w, lambda s: (s.get(TASKS_ACTIVE), s.get(queue)) == (2, 0))
        assert_stopped_at_zero(w)
        assert WARNING not in w.log()


def test_rabbitmq_worker_queue_length(rabbitmq_url, redis_url, tmp_path):
    """RabbitMQ: 15 published to -c 2: 2 active, 8 reserved (unacknowledged), 5 ready in the queue."""
    env = {**INTERVAL_ENV, "BACKEND_URL": redis_url}
    with prefork_worker(rabbitmq_url, tmp_path, concurrency=2, metrics=True, env=env) as w:
        app, t = make_app(rabbitmq_url, backend=redis_url, task_default_queue=w.queue)
        w.wait_ready(app)
        for _ in range(15):
            t.sleep.delay(SLEEP)
        queue = (QUEUE_LENGTH, w.queue)
        wait_snapshot(w, lambda s: (s.get(TASKS_ACTIVE), s.get(TASKS_RESERVED), s.get(POOL_SIZE), s.get(queue))
                      == (2, 8, 2, 5))
        with app.connection_for_write() as conn:
            assert conn.default_channel.queue_purge(w.queue) == 5
        wait_snapshot(w, lambda s: (s.get(TASKS_ACTIVE), s.get(queue)) == (2, 0))
        assert_stopped_at_zero(w)
        assert WARNING not in w.log()


@pytest.mark.parametrize("instrument_at", ["import", "worker_init"])
def test_recycled_children_write_no_health_point(redis_url, tmp_path, instrument_at):
    """--max-tasks-per-child 1: 20 children forked from a main process whose provider runs
    our callbacks; every child exits cleanly, and only the main process writes health.
    Instrumented inside a worker_init receiver, worker_ready still finds the worker."""
    with prefork_worker(redis_url, tmp_path, concurrency=2, max_tasks_per_child=1, metrics=True,
                        instrument_at=instrument_at, env=INTERVAL_ENV) as w:
        app, t = make_app(redis_url, task_default_queue=w.queue)
        w.wait_ready(app)
        results = [t.add.delay(i, 1) for i in range(20)]
        assert [r.get(timeout=60) for r in results] == [i + 1 for i in range(20)]
        wait_snapshot(w, lambda s: (s.get(TASKS_ACTIVE), s.get(TASKS_RESERVED), s.get(POOL_SIZE),
                                    s.get((QUEUE_LENGTH, w.queue))) == (0, 0, 2, 0))
        spans = w.wait_spans(lambda s: s if len([x for x in s if x["kind"] == "CONSUMER"]) == 20 else None)
        assert len({x["pid"] for x in spans if x["kind"] == "CONSUMER"} - {w.proc.pid}) == 20
        assert_stopped_at_zero(w)


def test_refused_connection_is_logged_once(redis_url, caplog):
    """Nothing listening: every refresh fails at once, one warning in all, no length."""
    port = free_port()
    app, _ = make_app(f"redis://127.0.0.1:{port}/0", backend=redis_url)
    attempts: list[float] = []
    real = app.connection_for_read

    def counted(*args: Any, **kwargs: Any) -> Any:
        attempts.append(time.monotonic())
        return real(*args, **kwargs)

    app.connection_for_read = counted
    lengths = QueueLengths(app, lambda: ["q"], interval_s=0.1)
    with caplog.at_level(logging.WARNING, logger="otel_celery_headers"):
        lengths.start()
        try:
            wait_until(lambda: len(attempts) >= 4)
        finally:
            lengths.stop()
            lengths._thread.join(10)
    assert [r.getMessage().count(WARNING) for r in caplog.records] == [1]
    assert lengths.lengths == {}


def test_rabbitmq_missing_queue_reads_zero_and_the_next_read_works(rabbitmq_url, redis_url):
    """A queue RabbitMQ does not know reads 0; its NOT_FOUND closed our channel, and the
    queue after it (and the next refresh) still reads exactly."""
    app, _ = make_app(rabbitmq_url, backend=redis_url)
    name, missing = f"hl-{uuid.uuid4().hex[:8]}", f"missing-{uuid.uuid4().hex[:8]}"
    with Connection(rabbitmq_url) as conn:
        queue = conn.SimpleQueue(name)
        for i in range(3):
            queue.put({"n": i})
        lengths = QueueLengths(app, lambda: [missing, name], interval_s=0.2)
        lengths.start()
        try:
            wait_until(lambda: lengths.lengths == {missing: 0, name: 3})
            queue.put({"n": 3})
            wait_until(lambda: lengths.lengths == {missing: 0, name: 4})
        finally:
            lengths.stop()
            lengths._thread.join(10)
            queue.queue.delete()
            queue.close()
    assert not lengths._thread.is_alive()


def wait_until(predicate: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_queue_length_off_means_no_points_and_no_connection(redis_url, tmp_path):
    """OTEL_PYTHON_CELERY_HEADERS_QUEUE_LENGTH=false: no celery.queue.length, and our thread
    never connects (the broker it would ask counts the connections: 0)."""
    with silent_server() as hole:
        env = {**INTERVAL_ENV, "QUEUE_LENGTH_URL": hole.url, "OTEL_PYTHON_CELERY_HEADERS_QUEUE_LENGTH": "false"}
        with prefork_worker(redis_url, tmp_path, concurrency=2, metrics=True, env=env) as w:
            app, _ = make_app(redis_url, task_default_queue=w.queue)
            w.wait_ready(app)
            deadline = time.monotonic() + 30
            # Six exports of the other health metrics (3 s) after the worker is ready.
            while sum(1 for _, s in snapshots(w.metric_points()) if s.get(POOL_SIZE) == 2) < 6:
                assert time.monotonic() < deadline, w.log()[-3000:]
                time.sleep(0.1)
            assert [p for p in w.metric_points() if p["name"] == QUEUE_LENGTH] == []
            assert hole.held == []


def test_broker_that_does_not_answer_costs_one_log_line_and_blocks_nothing(redis_url, tmp_path):
    """Our thread's broker accepts and never answers: one warning in the worker log, tasks
    run, exports keep their 500 ms pace while each attempt waits out its 5 s timeout."""
    with silent_server() as hole:
        env = {**INTERVAL_ENV, "QUEUE_LENGTH_URL": hole.url}
        with prefork_worker(redis_url, tmp_path, concurrency=2, metrics=True, env=env) as w:
            app, t = make_app(redis_url, task_default_queue=w.queue)
            w.wait_ready(app)
            results = [t.add.delay(i, i) for i in range(4)]
            assert [r.get(timeout=30) for r in results] == [0, 2, 4, 6]
            deadline = time.monotonic() + 40
            while len(hole.held) < 3:  # two attempts timed out, a third began
                assert time.monotonic() < deadline, w.log()[-3000:]
                time.sleep(0.1)
            times = [moment for moment, s in snapshots(w.metric_points()) if s.get(POOL_SIZE) == 2]
            assert w.log().count(WARNING) == 1
            assert [p for p in w.metric_points() if p["name"] == QUEUE_LENGTH] == []
        gaps = [(b - a) / 1e9 for a, b in zip(times, times[1:])]
        # At least 10 s of exports went by (two 5 s timeouts), none late by a timeout.
        assert (times[-1] - times[0]) / 1e9 >= 9.5
        assert max(gaps) < 2.5, gaps


def health_points() -> dict[Any, float]:
    data = METRICS.get_metrics_data()
    out: dict[Any, float] = {}
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name not in HEALTH:
                    continue
                for point in metric.data.data_points:
                    key: Any = metric.name
                    if metric.name == QUEUE_LENGTH:
                        key = (metric.name, point.attributes["messaging.destination.name"])
                    out[key] = point.value
    return out


def test_threads_pool_in_process_then_uninstrument_goes_quiet(redis_url, monkeypatch):
    """An embedded worker (threads, 4): pool size 4, queue length read; 0 held after
    its shutdown; nothing at all once uninstrumented; a later instrument() reports again."""
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "200")
    queue = f"hl-{uuid.uuid4().hex[:8]}"
    instrumentor = instrument()
    try:
        for round_ in range(2):
            app, t = make_app(redis_url, task_default_queue=queue)
            with start_worker(app, pool="threads", concurrency=4, perform_ping_check=False,
                              shutdown_timeout=60, loglevel="WARNING"):
                assert t.add.delay(1, 2).get(timeout=20) == 3
                wait_until(lambda: health_points() == {
                    TASKS_ACTIVE: 0, TASKS_RESERVED: 0, POOL_SIZE: 4, (QUEUE_LENGTH, queue): 0})
            # start_worker stops it cold (WorkerTerminate): no worker_shutdown, blueprint TERMINATE.
            assert health_points() == {TASKS_ACTIVE: 0, TASKS_RESERVED: 0, POOL_SIZE: 0}
            instrumentor.uninstrument()
            assert health_points() == {}
            if round_ == 0:
                instrumentor = instrument()
    finally:
        if instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.uninstrument()


def test_queue_length_option(monkeypatch):
    """On by default; the environment turns it off; a keyword beats the environment."""
    assert options.load({}).queue_length is True
    monkeypatch.setenv("OTEL_PYTHON_CELERY_HEADERS_QUEUE_LENGTH", "false")
    assert options.load({}).queue_length is False
    assert options.load({"queue_length": True}).queue_length is True
    with pytest.raises(ValueError):
        options.load({"queue_length": "no"})
