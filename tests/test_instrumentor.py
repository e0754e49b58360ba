"""The instrumentor contract: wrap/unwrap mirror, eager mode, broker down, errors swallowed."""

from __future__ import annotations

import logging

import pytest
import wrapt
from celery import signals
from celery.app.base import Celery
from celery.app.task import Task
from celery.worker.request import Request
from kombu.exceptions import OperationalError
from opentelemetry import trace
from opentelemetry.instrumentation.celery import CeleryInstrumentor
from opentelemetry.trace import SpanKind, StatusCode

from otel_celery_headers import CeleryHeadersInstrumentor
from tests.conftest import PROVIDER, instrument, make_app, wait_for, worker
from tests.support import servers
from tests.support.instrumentation import our_receivers, wrapped
from tests.support.spans import by_message, one, parent_id, span_id, trace_id

P, C = SpanKind.PRODUCER, SpanKind.CONSUMER


def test_instrument_uninstrument_are_exact_mirrors():
    """Every order of instrument/uninstrument leaves things wrapped once or not at all."""
    assert not wrapped(Task, "apply_async") and not wrapped(Celery, "send_task") and our_receivers() == 0
    instrumentor = CeleryHeadersInstrumentor()
    instrumentor.instrument(tracer_provider=PROVIDER)
    instrumentor.instrument(tracer_provider=PROVIDER)  # harmless
    assert wrapped(Task, "apply_async") and wrapped(Celery, "send_task")
    assert wrapped(Request, "on_failure") and wrapped(Request, "on_timeout")
    assert not isinstance(vars(Task)["apply_async"].__wrapped__, wrapt.FunctionWrapper)
    assert our_receivers() == 8
    instrumentor.uninstrument()
    instrumentor.uninstrument()  # harmless
    assert not wrapped(Task, "apply_async") and not wrapped(Celery, "send_task") and our_receivers() == 0
    assert not wrapped(Request, "on_failure") and not wrapped(Request, "on_timeout")
    instrumentor.instrument(tracer_provider=PROVIDER)
    assert wrapped(Task, "apply_async") and our_receivers() == 8
    instrumentor.uninstrument()
    assert not wrapped(Task, "apply_async") and our_receivers() == 0


def test_uninstrument_then_instrument_traces_again(redis_url, exporter, tracer):
    """After uninstrument nothing is traced; after instrument again, everything is."""
    app, t = make_app(redis_url)
    with worker(app):
        instrumentor = instrument()
        instrumentor.uninstrument()
        with tracer.start_as_current_span("request"):
            quiet = t.add.delay(1, 1)
        assert quiet.get(timeout=20) == 2
        assert not by_message(exporter.get_finished_spans(), quiet.id, C)
        assert not by_message(exporter.get_finished_spans(), quiet.id, P)
        instrumentor = instrument()
        try:
            with tracer.start_as_current_span("request") as root:
                loud = t.add.delay(2, 2)
            assert loud.get(timeout=20) == 4
            span = wait_for(lambda spans: one(spans, loud.id, C))
            assert trace_id(span) == trace_id(root)
        finally:
            instrumentor.uninstrument()


@pytest.mark.parametrize("official_first", [True, False])
def test_beside_the_official_instrumentation_one_span_each(redis_url, exporter, tracer, official_first):
    """With opentelemetry-instrumentation-celery also active, each message still gets one PRODUCER and one CONSUMER span."""
    official = CeleryInstrumentor()
    app, t = make_app(redis_url)
    try:
        if official_first:
            official.instrument(tracer_provider=PROVIDER)
            ours = instrument()
        else:
            ours = instrument()
            official.instrument(tracer_provider=PROVIDER)
        with worker(app):
            with tracer.start_as_current_span("request") as root:
                result = t.add.delay(3, 3)
            assert result.get(timeout=20) == 6
            span = wait_for(lambda spans: one(spans, result.id, C))
        assert trace_id(span) == trace_id(root)
        spans = exporter.get_finished_spans()
        assert len(by_message(spans, result.id, P)) == 1
        assert len([s for s in spans if s.kind == C]) == 1
        assert len([s for s in spans if s.kind == P]) == 1
    finally:
        ours.uninstrument()
    # Once we are gone, the official instrumentation can be switched on for real.
    before = len(signals.task_prerun.receivers)
    official.instrument(tracer_provider=PROVIDER)
    try:
        assert len(signals.task_prerun.receivers) == before + 1
    finally:
        official.uninstrument()


def test_eager_mode_span_is_a_child_of_the_caller(exporter, tracer):
    """task_always_eager and apply(): the task span is a child of the caller, no publish span."""
    instrumentor = instrument()
    try:
        app, t = make_app("memory://", backend="cache+memory://", task_always_eager=True)
        with tracer.start_as_current_span("request") as root:
            assert t.add.delay(1, 2).get() == 3
            assert t.add.apply((2, 3)).get() == 5
            assert trace.get_current_span() is root
        spans = exporter.get_finished_spans()
        consumers = [s for s in spans if s.kind == C]
        assert len(consumers) == 2
        assert all(parent_id(s) == span_id(root) for s in consumers)
        assert not [s for s in spans if s.kind == P]
    finally:
        instrumentor.uninstrument()


def test_eager_task_publishing_for_real_gets_its_own_publish_span(exporter, tracer):
    """A real publish (send_task) from inside an eager task is traced, under the task's span."""
    instrumentor = instrument()
    try:
        app, t = make_app("memory://", backend="cache+memory://", task_always_eager=True)
        with tracer.start_as_current_span("request") as root:
            sent_id = t.send_by_name.delay().get()
        spans = exporter.get_finished_spans()
        (task_span,) = [s for s in spans if s.kind == C]
        producer = one(spans, sent_id, P)
        assert producer is not None and producer.name == "send t.add"
        assert parent_id(producer) == span_id(task_span)
        assert trace_id(producer) == trace_id(root)
    finally:
        instrumentor.uninstrument()


def test_eager_propagated_failure_has_no_publish_span(exporter, tracer):
    """task_eager_propagates: the user's exception comes back through delay(), with no PRODUCER span."""
    instrumentor = instrument()
    try:
        app, t = make_app("memory://", backend="cache+memory://", task_always_eager=True,
                          task_eager_propagates=True)
        with tracer.start_as_current_span("request"):
            with pytest.raises(ValueError, match="boom"):
                t.fail.delay()
        spans = exporter.get_finished_spans()
        assert not [s for s in spans if s.kind == P]
        (span,) = [s for s in spans if s.kind == C]
        assert span.status.status_code == StatusCode.ERROR
    finally:
        instrumentor.uninstrument()


def test_eager_failure_with_throw_marks_the_span_and_reraises(exporter, tracer):
    """apply(throw=True): the user's exception reaches the caller unchanged and the span is ERROR."""
    instrumentor = instrument()
    try:
        app, t = make_app("memory://", backend="cache+memory://")
        with tracer.start_as_current_span("request"):
            with pytest.raises(ValueError, match="boom"):
                t.fail.apply(throw=True)
        (span,) = [s for s in exporter.get_finished_spans() if s.kind == C]
        assert span.status.status_code == StatusCode.ERROR
    finally:
        instrumentor.uninstrument()


def test_broker_down_publish_span_is_ended_error_and_context_restored(exporter, tracer):
    """Broker unreachable: the broker's own error reaches the caller, the publish span is ERROR and ended, and the caller's span is current again."""
    instrumentor = instrument()
    try:
        app, t = make_app(
            f"redis://127.0.0.1:{servers.free_port()}", backend="cache+memory://",
            broker_connection_timeout=1,
        )
        with tracer.start_as_current_span("request") as root:
            with pytest.raises(OperationalError):
                t.add.apply_async((1, 1), retry=False)
            assert trace.get_current_span() is root
        (producer,) = [s for s in exporter.get_finished_spans() if s.kind == P]
        assert producer.end_time is not None
        assert producer.status.status_code == StatusCode.ERROR
        assert parent_id(producer) == span_id(root)
    finally:
        instrumentor.uninstrument()


def test_failing_hooks_are_logged_once_and_never_raise(redis_url, exporter, tracer, caplog):
    """A publish_hook and a process_hook that raise: tasks still publish and run; one log line per kind."""
    def bad_publish_hook(span, name, headers):
        raise RuntimeError("publish hook bug")

    def bad_process_hook(span, task):
        raise RuntimeError("process hook bug")

    instrumentor = instrument(publish_hook=bad_publish_hook, process_hook=bad_process_hook)
    app, t = make_app(redis_url)
    try:
        with caplog.at_level(logging.WARNING, logger="otel_celery_headers"), worker(app):
            with tracer.start_as_current_span("request") as root:
                results = [t.add.delay(i, i) for i in range(3)]
            assert [r.get(timeout=20) for r in results] == [0, 2, 4]
            for r in results:
                span = wait_for(lambda spans, r=r: one(spans, r.id, C))
                assert trace_id(span) == trace_id(root)
    finally:
        instrumentor.uninstrument()
    ours = [r for r in caplog.records if r.name == "otel_celery_headers"]
    assert sum("publish_hook" in r.getMessage() for r in ours) == 1
    assert sum("process_hook" in r.getMessage() for r in ours) == 1


def test_hooks_see_the_span_and_message(redis_url, exporter, tracer):
    """publish_hook gets (span, task name, headers); process_hook gets (span, task)."""
    def on_publish(span, name, headers):
        span.set_attribute("app.published_task", name)
        span.set_attribute("app.has_id", bool(headers.get("id")))

    def on_process(span, task):
        span.set_attribute("app.processed_task", task.name)

    instrumentor = instrument(publish_hook=on_publish, process_hook=on_process)
    app, t = make_app(redis_url)
    try:
        with worker(app):
            result = t.add.delay(1, 1)
            assert result.get(timeout=20) == 2
            consumer = wait_for(lambda spans: one(spans, result.id, C))
            producer = one(exporter.get_finished_spans(), result.id, P)
    finally:
        instrumentor.uninstrument()
    assert producer.attributes["app.published_task"] == "t.add" and producer.attributes["app.has_id"]
    assert consumer.attributes["app.processed_task"] == "t.add"


METRICS_LATER = r'''
import json
from celery import Celery
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from otel_celery_headers import CeleryHeadersInstrumentor

CeleryHeadersInstrumentor().instrument(tracer_provider=TracerProvider())
app = Celery("later", broker="memory://", set_as_current=False)


@app.task(name="t.add", shared=False)
def add(x, y):
    return x + y


add.delay(1, 2)   # no MeterProvider anywhere yet
add.apply((1, 2))
reader = InMemoryMetricReader()
metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
for _ in range(3):
    add.delay(1, 2)
    add.apply((1, 2))
sums = {}
for rm in reader.get_metrics_data().resource_metrics:
    for sm in rm.scope_metrics:
        for metric in sm.metrics:
            if metric.name.endswith("messages"):
                sums[metric.name] = sum(p.value for p in metric.data.data_points)
print(json.dumps(sums))
'''


def test_meter_provider_set_after_instrument_is_picked_up():
    """Without a MeterProvider we skip building measurements; one set globally later still gets every message from then on."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", METRICS_LATER], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == {
        "messaging.client.sent.messages": 3, "messaging.client.consumed.messages": 3}


DELIVERIES_LATER = r'''
import json, sys
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from otel_celery_headers import CeleryHeadersInstrumentor
from tests.conftest import make_app, worker

CeleryHeadersInstrumentor().instrument(tracer_provider=TracerProvider())
app, t = make_app(sys.argv[1], task_default_queue="later")
with worker(app):
    assert t.add.delay(1, 2).get(timeout=20) == 3   # no MeterProvider anywhere yet
    reader = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    for _ in range(3):
        assert t.add.delay(1, 2).get(timeout=20) == 3
    t.add.delay(0, 0).get(timeout=20)  # a fence: the three before it are finished
found = {}
for rm in reader.get_metrics_data().resource_metrics:
    for sm in rm.scope_metrics:
        for metric in sm.metrics:
            for p in metric.data.data_points:
                if dict(p.attributes).get("celery.task.name") == "t.add":
                    found[metric.name] = found.get(metric.name, 0) + (
                        p.value if hasattr(p, "value") else p.count)
print(json.dumps(found))
'''


def test_worker_deliveries_are_counted_once_a_meter_provider_is_set_later(redis_url):
    """The worker's main process reads no headers while no MeterProvider is behind our
    instruments (issue 12); one set globally later gets every delivery from then on,
    with its time in queue."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", DELIVERIES_LATER, redis_url], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == {
        "messaging.client.sent.messages": 4,
        "messaging.client.operation.duration": 4,
        "messaging.client.consumed.messages": 4,
        "messaging.process.duration": 4,
        "celery.message.queue_time": 4,
    }
