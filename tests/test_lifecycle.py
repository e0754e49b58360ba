"""Flusher in a pool child: flush after tasks and at exit with flush_timeout_ms; 0 means never."""

from __future__ import annotations

import threading
import time

import pytest

from otel_celery_headers import lifecycle
from otel_celery_headers.lifecycle import Flusher


class RecordingProvider:
    """A provider whose force_flush records the timeout it was given."""

    def __init__(self) -> None:
        self.timeouts: list[int] = []

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        self.timeouts.append(timeout_millis)
        return True


def flush_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "otel-celery-flush"]


@pytest.fixture
def pool_child(monkeypatch):
    """This process taken for a prefork pool child (the Flusher only acts there)."""
    monkeypatch.setattr(lifecycle, "in_pool_child", lambda: True)
    assert flush_threads() == []


def poll(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_flush_after_task_and_at_exit_use_the_timeout(pool_child):
    """flush_timeout_ms=1234: the after-task flush and the exit flush both get 1234 ms."""
    spans, metrics = RecordingProvider(), RecordingProvider()
    flusher = Flusher(spans, metrics, 1234, 200)
    flusher.task_done()
    (thread,) = flush_threads()
    poll(lambda: spans.timeouts == [1234])
    flusher.on_process_shutdown()
    assert spans.timeouts == [1234, 1234] and metrics.timeouts == [1234]
    flusher.stop()
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_zero_timeout_never_flushes(pool_child):
    """flush_timeout_ms=0: no flush after tasks (no thread at all; it once waited up to 5 s there)
    and none at exit."""
    spans, metrics = RecordingProvider(), RecordingProvider()
    flusher = Flusher(spans, metrics, 0, 200)
    for _ in range(3):
        flusher.task_done()
    assert flush_threads() == []
    flusher.on_process_shutdown()
    assert spans.timeouts == [] and metrics.timeouts == []
    flusher.stop()


def test_zero_interval_flushes_only_at_exit(pool_child):
    """child_flush_interval_ms=0: no thread after tasks, the exit flush still runs."""
    spans, metrics = RecordingProvider(), RecordingProvider()
    flusher = Flusher(spans, metrics, 1234, 0)
    flusher.task_done()
    assert flush_threads() == []
    flusher.on_process_shutdown()
    assert spans.timeouts == [1234] and metrics.timeouts == [1234]
    flusher.stop()


def test_instrument_imports_ahead_what_the_first_http_export_imports_lazily():
    """A pool child forked while the main process's export thread is inside
    `import netrc` (requests does it on its first request) would inherit that module's
    import lock held and hang on its own first export: instrument() imports it first."""
    import sys

    from tests.conftest import instrument

    saved = sys.modules.pop("netrc", None)
    try:
        instrumentor = instrument()
        try:
            assert "netrc" in sys.modules
        finally:
            instrumentor.uninstrument()
    finally:
        if saved is not None:
            sys.modules["netrc"] = saved


def test_task_done_says_whether_it_has_anything_to_do_in_this_process(monkeypatch):
    """Outside a pool child it does nothing, and says so (False) so the consumer stops
    calling it; in a pool child with flushing on, it wakes the thread (True)."""
    spans = RecordingProvider()
    monkeypatch.setattr(lifecycle, "in_pool_child", lambda: False)
    assert Flusher(spans, None, 1234, 200).task_done() is False
    assert Flusher(spans, None, 0, 200).task_done() is False
    monkeypatch.setattr(lifecycle, "in_pool_child", lambda: True)
    assert Flusher(spans, None, 0, 200).task_done() is False  # flushing off
    flusher = Flusher(spans, None, 1234, 200)
    assert flusher.task_done() is True
    (thread,) = flush_threads()
    flusher.stop()
    thread.join(timeout=10)
    assert not thread.is_alive()


@pytest.mark.parametrize("answer, calls", [(True, 3), (False, 1)])
def test_the_consumer_stops_asking_once_told_nothing_is_to_be_done(answer, calls):
    """Three tasks: the after-task callback is called after each while it answers True,
    and only once in this process once it answers False."""
    from celery import Celery
    from opentelemetry.metrics import NoOpMeterProvider
    from opentelemetry.sdk.trace import TracerProvider

    from otel_celery_headers.consumer import Consumer
    from otel_celery_headers.metrics import Instruments
    from otel_celery_headers.options import Options

    app = Celery("quiet", broker="memory://", set_as_current=False)

    @app.task(name="t.noop", shared=False)
    def noop() -> None:
        return None

    asked: list[int] = []
    consumer = Consumer(
        TracerProvider().get_tracer("tests"), Options(),
        Instruments.create(NoOpMeterProvider().get_meter("tests")),
        after_task=lambda: asked.append(1) is None and answer,
    )
    for i in range(3):
        noop.push_request(id=f"task-{i}", delivery_info={"routing_key": "celery"})
        try:
            consumer.on_prerun(task_id=f"task-{i}", task=noop)
            consumer.on_postrun(task_id=f"task-{i}", task=noop, state="SUCCESS", retval=None)
        finally:
            noop.pop_request()
    assert len(asked) == calls


def test_each_forked_child_is_a_new_generation_and_decides_again(monkeypatch):
    """Per-process decisions are cached against lifecycle.generation (no getpid per task):
    a child forked after the parent decided must see a new generation and decide again."""
    import os

    monkeypatch.setattr(lifecycle, "_child_of", None)
    before = lifecycle.generation
    assert lifecycle.in_pool_child() is False  # decided here, in the parent
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running pytest's teardown
        try:
            answer = f"{lifecycle.generation - before} {lifecycle._child_of is not None and lifecycle._child_of[0] == lifecycle.generation}"
            os.write(write, answer.encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        reported = pipe.read()
    os.waitpid(pid, 0)
    assert reported == "1 False"  # one fork further; the parent's answer not taken as its own
    assert lifecycle.generation == before
