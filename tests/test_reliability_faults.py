"""Faults around the instrumentation: the broker goes away and comes back, the exporter breaks."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import redis
from celery import signals
from kombu.exceptions import OperationalError
from opentelemetry import baggage, context, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from otel_celery_headers import CeleryHeadersInstrumentor
from tests.conftest import METER_PROVIDER, make_app, wait_for, worker
from tests.support.reliability import (
    BlockingExporter,
    RaisingExporter,
    capture_our_logger,
    restartable_redis,
)
from tests.support.spans import attr, named, one, parent_id, span_id, trace_id

P, C = SpanKind.PRODUCER, SpanKind.CONSUMER
TIMEOUT = 60
# Shortened from Celery's default (3 retries, 0.2 s apart): the broker is down for good here.
SHORT_RETRY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.1, "interval_max": 0.1}


def causes(exc: BaseException) -> list[type[BaseException]]:
    found = []
    seen: BaseException | None = exc
    while seen is not None and len(found) < 10:
        found.append(type(seen))
        seen = seen.__cause__ or seen.__context__
    return found


# -- the broker stops and starts again --------------------------------------------------


def test_broker_down_publishes_fail_with_the_brokers_error_then_recover(redis_url, exporter, tracer, instrumented):
    """Broker stopped: each publish raises kombu's OperationalError, its span ends as ERROR and the caller's span stays current; restarted: tasks trace end to end on the same worker."""
    with restartable_redis() as broker:
        # Results go to the session Redis, which stays up: only the broker fails.
        app, t = make_app(broker.url, backend=redis_url, task_default_queue="restart",
                          task_publish_retry_policy=SHORT_RETRY)
        with worker(app):
            with tracer.start_as_current_span("before") as before_root:
                before = t.add.delay(1, 2)
            assert before.get(timeout=TIMEOUT) == 3

            broker.stop()
            attempts = {
                "apply_async(retry=False)": lambda: t.add.apply_async((1, 1), retry=False),
                "apply_async(retry_policy=...)": lambda: t.add.apply_async(
                    (1, 1), retry=True, retry_policy=SHORT_RETRY),
                "delay()": lambda: t.add.delay(1, 1),
                "send_task(retry=False)": lambda: app.send_task("t.add", (1, 1), retry=False),
            }
            token = context.attach(baggage.set_baggage("tenant", "acme"))
            try:
                with capture_our_logger() as logged:
                    for label, publish in attempts.items():
                        with tracer.start_as_current_span(f"caller {label}") as caller:
                            with pytest.raises(OperationalError) as raised:
                                publish()
                            # The caller is still in its own span, with its own baggage.
                            assert trace.get_current_span() is caller, label
                            assert baggage.get_baggage("tenant") == "acme", label
                        assert redis.exceptions.ConnectionError in causes(raised.value), label
                        (failed,) = [s for s in exporter.get_finished_spans()
                                     if s.kind == P and parent_id(s) == span_id(caller)]
                        assert failed.name == "send t.add" and failed.end_time is not None
                        assert failed.status.status_code == StatusCode.ERROR, label
                        assert attr(failed, "error.type") == "kombu.exceptions.OperationalError"
                        assert [e.name for e in failed.events] == ["exception"]
                        assert trace_id(failed) == trace_id(caller)
            finally:
                context.detach(token)
            # Nothing from the publishes. The worker's queue-length thread may poll while
            # the broker is down: its one documented line (queue_length.py) is not theirs.
            assert [r.getMessage() for r in logged if r.threadName != "otel-celery-queue-length"] == []
            assert not trace.get_current_span().get_span_context().is_valid
            assert baggage.get_all() == {}

            broker.start()  # same port, empty: the worker reconnects and redeclares its queue
            with tracer.start_as_current_span("after") as root:
                results = [t.add.delay(i, i) for i in range(5)]
            assert [r.get(timeout=TIMEOUT) for r in results] == [0, 2, 4, 6, 8]
            for result in results:
                producer = wait_for(lambda spans, i=result.id: one(spans, i, P))
                consumer = wait_for(lambda spans, i=result.id: one(spans, i, C))
                assert producer.status.status_code == StatusCode.UNSET
                assert trace_id(consumer) == trace_id(producer) == trace_id(root)
                assert parent_id(consumer) == span_id(producer)
        (first,) = [s for s in exporter.get_finished_spans()
                    if s.kind == C and attr(s, "messaging.message.id") == before.id]
        assert trace_id(first) == trace_id(before_root)


# -- the exporter breaks ----------------------------------------------------------------


@pytest.fixture(params=["raising", "blocking"])
def faulty(request: pytest.FixtureRequest) -> Iterator[SimpleNamespace]:
    """A TracerProvider whose batch exporter raises on, or blocks 1 s in, every export.

    A healthy in-memory exporter beside it shows what the instrumentation produced.
    """
    bad = RaisingExporter() if request.param == "raising" else BlockingExporter(1.0)
    healthy = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    # Small batches and a small queue: the blocking exporter fills it, so spans are dropped too.
    provider.add_span_processor(BatchSpanProcessor(
        bad, schedule_delay_millis=50, max_export_batch_size=16, max_queue_size=64))
    provider.add_span_processor(SimpleSpanProcessor(healthy))
    instrumentor = CeleryHeadersInstrumentor()
    instrumentor.instrument(tracer_provider=provider, meter_provider=METER_PROVIDER)
    try:
        yield SimpleNamespace(kind=request.param, bad=bad, healthy=healthy, provider=provider)
    finally:
        instrumentor.uninstrument()
        if isinstance(bad, BlockingExporter):
            bad.release()
        provider.shutdown()


def test_a_failing_exporter_never_reaches_tasks_or_callers(redis_url, exporter, faulty):
    """An exporter that raises, or blocks 1 s, on every export: 100 tasks run and return, nothing raises, no export runs on a task's or the caller's thread, and every span is still made."""
    # instrument() above used the faulty provider; the callers' own spans come from it too.
    caller_tracer = faulty.provider.get_tracer("caller")
    app, t = make_app(redis_url, task_default_queue=f"faulty-{faulty.kind}")
    task_threads: set[int] = set()

    def note_thread(**_):
        task_threads.add(threading.get_ident())

    signals.task_prerun.connect(note_thread, weak=False, dispatch_uid="reliability-task-thread")
    try:
        with capture_our_logger() as logged, worker(app):
            with caller_tracer.start_as_current_span("request") as root:
                results = [t.add.delay(i, 1) for i in range(100)]
                seen = [t.whoami.delay() for _ in range(10)]
            assert [r.get(timeout=TIMEOUT) for r in results] == [i + 1 for i in range(100)]
            for view in (r.get(timeout=TIMEOUT) for r in seen):
                assert view["trace_id"] == format(trace_id(root), "032x")
            wait_for(lambda _: all(one(faulty.healthy.get_finished_spans(), r.id, C)
                                   for r in results + seen), timeout=TIMEOUT)
    finally:
        signals.task_prerun.disconnect(dispatch_uid="reliability-task-thread")
    assert logged == []
    assert all(r.state == "SUCCESS" for r in results + seen)
    assert faulty.bad.calls > 0  # the fault was hit
    # Exports happen on the processor's own thread, never where tasks or publishes run.
    assert task_threads and not faulty.bad.threads & (task_threads | {threading.get_ident()})
    spans = faulty.healthy.get_finished_spans()
    for result in results:
        producer, consumer = one(spans, result.id, P), one(spans, result.id, C)
        assert trace_id(consumer) == trace_id(root) and parent_id(consumer) == span_id(producer)
        assert consumer.status.status_code != StatusCode.ERROR
    # The task bodies' own spans use the global provider: the fault did not spread there.
    assert len([s for s in named(exporter.get_finished_spans(), "add-body")
                if trace_id(s) == trace_id(root)]) == 100
