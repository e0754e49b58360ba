"""The main process's delivery metrics reuse attribute dicts: each point still has exactly its own.

Unit level, with an SDK MeterProvider and an in-memory reader (no worker: deliveries.py's
real-worker tests, test_deliveries.py, count the outcomes end to end)."""

from __future__ import annotations

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from otel_celery_headers.delivery_metrics import NO_EXEMPLAR, DeliveryMetrics
from otel_celery_headers.metrics import Instruments


def _points(reader: InMemoryMetricReader, name: str) -> dict[frozenset, float]:
    found: dict[frozenset, float] = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    for point in metric.data.data_points:
                        value = getattr(point, "value", None)
                        found[frozenset(point.attributes.items())] = (
                            value if value is not None else point.count
                        )
    return found


def test_reused_attributes_never_carry_another_deliverys_outcome():
    """Successes, failures with two error types and a redelivery, interleaved: each series
    counts exactly its deliveries, and no error.type leaks into a success or another error."""
    reader = InMemoryMetricReader()
    metrics = DeliveryMetrics(Instruments.create(MeterProvider(metric_readers=[reader]).get_meter("t")))
    outcomes = [("SUCCESS", None, False), ("FAILURE", KeyError("k"), False),
                ("SUCCESS", None, False), ("FAILURE", ValueError("v"), False),
                ("SUCCESS", None, True), ("FAILURE", KeyError("k"), False)]
    for state, error, again in outcomes:
        metrics.accepted("t.add", "redis", "celery", again, 0.5, NO_EXEMPLAR)
        metrics.finished("t.add", "redis", "celery", again, state, error, 0.1, None, NO_EXEMPLAR)
    base = {"messaging.system": "redis", "messaging.operation.name": "process",
            "celery.task.name": "t.add", "messaging.destination.name": "celery"}

    def key(**extra: object) -> frozenset:
        return frozenset({**base, **extra}.items())

    assert _points(reader, "messaging.client.consumed.messages") == {
        key(**{"celery.task.state": "SUCCESS"}): 2,
        key(**{"celery.task.state": "SUCCESS", "celery.delivery.redelivered": True}): 1,
        key(**{"celery.task.state": "FAILURE", "error.type": "KeyError"}): 2,
        key(**{"celery.task.state": "FAILURE", "error.type": "ValueError"}): 1,
    }
    assert _points(reader, "celery.message.queue_time") == {
        key(): 5, key(**{"celery.delivery.redelivered": True}): 1,
    }
