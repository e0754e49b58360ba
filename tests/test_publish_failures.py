"""A publish that fails before its message is sent still gets one ERROR publish span, in eager apps too."""

from __future__ import annotations

import pytest
from kombu.exceptions import OperationalError
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

from tests.conftest import instrument, make_app
from tests.support import servers
from tests.support.spans import attr, parent_id, span_id

P = SpanKind.PRODUCER
# Celery's own warning when send_task meets task_always_eager: expected here.
pytestmark = pytest.mark.filterwarnings("ignore::celery.exceptions.AlwaysEagerIgnored")


@pytest.fixture
def instrumentor():
    instrumentor = instrument()
    yield instrumentor
    instrumentor.uninstrument()


def only_producer(exporter):
    spans = [s for s in exporter.get_finished_spans() if s.kind == P]
    assert len(spans) == 1, spans
    return spans[0]


@pytest.mark.parametrize("eager", [False, True])
def test_send_task_with_bad_arguments_has_one_error_span(instrumentor, exporter, tracer, eager):
    """send_task is never eager: with task_always_eager or not, Celery's TypeError for args=5
    reaches the caller unchanged and the publish span says so (it was missing in eager apps)."""
    app, _ = make_app("memory://", backend="cache+memory://", task_always_eager=eager)
    with tracer.start_as_current_span("request") as root:
        with pytest.raises(TypeError, match="^task args must be a list or tuple$"):
            app.send_task("t.add", args=5)
        assert trace.get_current_span() is root
    span = only_producer(exporter)
    assert span.name == "send t.add"
    assert span.status.status_code == StatusCode.ERROR
    assert attr(span, "error.type") == "TypeError"
    assert attr(span, "celery.task.name") == "t.add"
    assert parent_id(span) == span_id(root)
    assert span.end_time is not None


def test_eager_app_send_task_broker_refusing_has_one_error_span(instrumentor, exporter, tracer):
    """task_always_eager and a broker that refuses connections: send_task fails with kombu's
    OperationalError, and its publish span is ERROR with that error.type."""
    app, _ = make_app(
        f"redis://127.0.0.1:{servers.free_port()}", backend="cache+memory://",
        task_always_eager=True, broker_connection_timeout=1,
    )
    with tracer.start_as_current_span("request") as root:
        with pytest.raises(OperationalError):
            app.send_task("t.add", (1, 1), retry=False)
        assert trace.get_current_span() is root
    span = only_producer(exporter)
    assert span.name == "send t.add"
    assert span.status.status_code == StatusCode.ERROR
    assert attr(span, "error.type") == "kombu.exceptions.OperationalError"
    assert parent_id(span) == span_id(root)


def test_eager_apply_async_failure_still_has_no_publish_span(instrumentor, exporter, tracer):
    """The early return stays for apply_async in an eager app: the task ran in place, its own
    span carries the failure."""
    app, t = make_app("memory://", backend="cache+memory://", task_always_eager=True,
                      task_eager_propagates=True)
    with tracer.start_as_current_span("request"):
        with pytest.raises(ValueError, match="boom"):
            t.fail.apply_async()
    assert [s for s in exporter.get_finished_spans() if s.kind == P] == []
    (consumer,) = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.CONSUMER]
    assert consumer.status.status_code == StatusCode.ERROR


def test_a_publish_failing_before_its_message_is_built_is_counted_with_its_task(exporter, tracer):
    """messaging.client.sent.messages: one point, naming the task, the broker, the
    operation and the error (it once carried error.type alone)."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    instrumentor = instrument(meter_provider=MeterProvider(metric_readers=[reader]))
    try:
        app, _ = make_app("memory://", backend="cache+memory://")
        with tracer.start_as_current_span("request"):
            with pytest.raises(TypeError, match="^task args must be a list or tuple$"):
                app.send_task("t.add", args=5)
    finally:
        instrumentor.uninstrument()
    points = [
        (dict(point.attributes), point.value)
        for resource in reader.get_metrics_data().resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics if metric.name == "messaging.client.sent.messages"
        for point in metric.data.data_points
    ]
    assert points == [({
        "messaging.system": "memory",
        "messaging.operation.name": "send",
        "celery.task.name": "t.add",
        "error.type": "TypeError",
    }, 1)]
