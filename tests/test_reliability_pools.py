"""Pools under stress, in real `celery worker` subprocesses: killed prefork children, 200 green threads."""

from __future__ import annotations

import os
import signal
import time
import uuid

import pytest
from celery.result import ResultSet
from opentelemetry.trace import SpanKind

from tests.conftest import make_app, wait_for
from tests.support.prefork import prefork_worker
from tests.support.reliability import children_of, pool_worker, wait_until
from tests.support.spans import one, span_id, trace_id

P = SpanKind.PRODUCER
TIMEOUT = 60
# A pool child exports within child_flush_interval_ms (200 ms) of a task's end; the
# worker's BatchSpanProcessor (tests/support/worker_app.py) only after 60 s.
FLUSHED = 20



def hexid(value: int, width: int) -> str:
    return format(value, f"0{width}x")


def consumers(spans, task_id):
    return [s for s in spans if s["kind"] == "CONSUMER"
            and s["attributes"].get("messaging.message.id") == task_id]


# -- prefork: children SIGKILLed, children recycled -------------------------------------


def live_children(pid: int, count: int) -> set[int] | None:
    found = children_of(pid)
    return found if len(found) == count else None


def settled_children(pid: int, count: int) -> set[int] | None:
    """``count`` children, the same ones a second later: with --max-tasks-per-child 1 a
    child that has just run its task is about to exit (CI once saw one gone between the
    look and the kill: ProcessLookupError)."""
    found = live_children(pid, count)
    if found is None:
        return None
    time.sleep(1.0)
    return found if children_of(pid) == found else None


@pytest.mark.parametrize("max_tasks_per_child", [None, 1], ids=["long-lived", "max-tasks-per-child-1"])
def test_sigkilled_pool_children_lose_no_finished_span(redis_url, tmp_path, exporter, tracer, producer_side, max_tasks_per_child):
    """Pool children SIGKILLed between two batches: every finished task's CONSUMER span is in the file exactly once.

    The worker's BatchSpanProcessor exports only once a minute, so the first batch's
    spans are in the file before the kill only because each child exports shortly
    after its tasks end (child_flush_interval_ms); a SIGKILLed child flushes nothing.
    """
    with prefork_worker(redis_url, tmp_path, concurrency=2, max_tasks_per_child=max_tasks_per_child) as w:
        _, t = make_app(redis_url, task_default_queue=w.queue)
        with tracer.start_as_current_span("first") as first_root:
            first = [t.add.delay(i, i) for i in range(10)]
        assert [r.get(timeout=TIMEOUT) for r in first] == [2 * i for i in range(10)]
        # Well under the worker's 60 s batch delay: only the children's own export gets them there.
        w.wait_spans(lambda spans: all(consumers(spans, r.id) for r in first), timeout=FLUSHED)

        # With --max-tasks-per-child 1 a child may be between exit and replacement: take two live ones.
        killed = wait_until(lambda: settled_children(w.proc.pid, 2), TIMEOUT, "two pool children")
        for pid in killed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # it left by itself after all: gone, as killed
                pass
        # Celery replaces them; wait for two new children before publishing more.
        wait_until(lambda: len(children_of(w.proc.pid) - killed) == 2, TIMEOUT, "new pool children")

        with tracer.start_as_current_span("second") as second_root:
            second = [t.add.delay(i, 100) for i in range(10)]
        assert [r.get(timeout=TIMEOUT) for r in second] == [i + 100 for i in range(10)]
        w.stop()
        spans = w.spans()
        log = w.log()

    for results, root in ((first, first_root), (second, second_root)):
        for result in results:
            found = consumers(spans, result.id)
            assert len(found) == 1, f"{len(found)} CONSUMER spans for {result.id}"
            producer = wait_for(lambda ps, i=result.id: one(ps, i, P))
            assert found[0]["trace_id"] == hexid(trace_id(root), 32)
            assert found[0]["parent_id"] == hexid(span_id(producer), 16)
            assert found[0]["status"] != "ERROR"
    first_pids = {consumers(spans, r.id)[0]["pid"] for r in first}
    second_pids = {consumers(spans, r.id)[0]["pid"] for r in second}
    if max_tasks_per_child is None:
        assert first_pids <= killed  # the killed children had run the first batch
    assert not second_pids & killed  # and new ones ran the second
    assert "SIGKILL" in log or "signal 9" in log, "the worker did not notice the kill"


# -- green pools: 200 tasks at once in one process --------------------------------------


# Both are test dependencies (pyproject's "test" extra): a missing one fails, never skips.
@pytest.mark.parametrize("pool", ["gevent", "eventlet"])
def test_200_concurrent_green_tasks_each_keep_their_own_trace(redis_url, tmp_path, exporter, tracer, producer_side, pool):
    """--pool gevent/eventlet, concurrency 200: 200 tasks in flight at once, each published under its own root span, each sees only its own trace."""
    parties = 200
    key = f"rendezvous:{uuid.uuid4().hex}"
    with pool_worker(redis_url, tmp_path, pool=pool, concurrency=parties) as w:
        app, _ = make_app(redis_url, task_default_queue=w.queue)
        roots, results = [], []
        for i in range(parties):
            with tracer.start_as_current_span(f"request {i}") as root:
                results.append(app.send_task("r.rendezvous", (key, parties)))
            roots.append(root)
        # One bulk wait (the backend's native join), not 200 one-by-one subscriptions:
        # Celery 5.3's redis result consumer can spend a second on each of those.
        seen = ResultSet(results).get(timeout=3 * TIMEOUT)
        spans = w.wait_spans(lambda s: s if all(consumers(s, r.id) for r in results) else None,
                             timeout=TIMEOUT)
        w.stop()

    # Every task waited until all 200 were running: they truly ran at the same time.
    assert all(view["met"] for view in seen)
    for root, result, view in zip(roots, results, seen):
        (consumer,) = consumers(spans, result.id)
        producer = wait_for(lambda ps, i=result.id: one(ps, i, P))
        own = hexid(trace_id(root), 32)
        assert consumer["trace_id"] == own and consumer["parent_id"] == hexid(span_id(producer), 16)
        # Before, during and after 200 greenlets switched around it, the body saw its own span.
        assert view["before"] == view["after"] == {"trace_id": own, "span_id": consumer["span_id"]}
        body = [s for s in spans if s["name"] == "rendezvous-body" and s["span_id"] == view["inside"]["span_id"]]
        assert len(body) == 1 and body[0]["parent_id"] == consumer["span_id"]
        assert body[0]["trace_id"] == own
    assert len({view["before"]["trace_id"] for view in seen}) == parties
