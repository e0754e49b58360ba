"""The demo's metrics summary (examples/fastapi_celery/metrics_summary.py): OTLP
metrics in, one point per stream, sums across writers, bucket percentiles out.

Hand-built ``ExportMetricsServiceRequest`` s first (exact numbers), then the SDK's
own OTLP/HTTP exporter into the demo's receiver. Runs without the demo's extras.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
    OTLPMetricExporter,
)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource

from tests.support.example import load

ms = load("metrics_summary")
otlp_receiver = load("otlp_receiver")

CUMULATIVE = metrics_pb2.AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
DELTA = metrics_pb2.AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA
BOUNDS = [0.005, 0.01, 0.025, 0.05, 0.1]
SUCCESS = {"celery.task.name": "process_order", "celery.task.state": "SUCCESS",
           "messaging.system": "redis", "messaging.destination.name": "orders-demo"}
FAILURE = dict(SUCCESS, **{"celery.task.state": "FAILURE", "error.type": "PaymentDeclined"})
QUEUE = {"messaging.system": "redis", "messaging.destination.name": "orders-demo"}


def _kv(attributes: dict[str, Any]) -> list[KeyValue]:
    out = []
    for key, value in attributes.items():
        if isinstance(value, str):
            any_value = AnyValue(string_value=value)
        elif isinstance(value, int):
            any_value = AnyValue(int_value=value)
        else:
            any_value = AnyValue(double_value=value)
        out.append(KeyValue(key=key, value=any_value))
    return out


def _request(writer: str, time_ns: int,
             *metrics: metrics_pb2.Metric) -> ExportMetricsServiceRequest:
    """One export of one writer (process): its resource, one scope."""
    request = ExportMetricsServiceRequest()
    resource_metrics = request.resource_metrics.add()
    resource_metrics.resource.attributes.extend(_kv({
        "service.name": "orders-worker", "service.instance.id": writer}))
    scope_metrics = resource_metrics.scope_metrics.add()
    scope_metrics.scope.name = "otel_celery_headers"
    for metric in metrics:
        for point in getattr(metric, metric.WhichOneof("data")).data_points:
            point.time_unix_nano = time_ns
        scope_metrics.metrics.append(metric)
    return request


def _counter(name: str, *points: tuple[dict[str, Any], int],
             temporality: int = CUMULATIVE) -> metrics_pb2.Metric:
    metric = metrics_pb2.Metric(name=name, unit="{message}")
    metric.sum.aggregation_temporality = temporality
    metric.sum.is_monotonic = True
    for attributes, value in points:
        metric.sum.data_points.add(attributes=_kv(attributes), as_int=value)
    return metric


def _gauge(name: str, attributes: dict[str, Any], value: int) -> metrics_pb2.Metric:
    metric = metrics_pb2.Metric(name=name)
    metric.gauge.data_points.add(attributes=_kv(attributes), as_int=value)
    return metric


def _up_down(name: str, value: int) -> metrics_pb2.Metric:
    metric = metrics_pb2.Metric(name=name)
    metric.sum.aggregation_temporality = CUMULATIVE
    metric.sum.is_monotonic = False
    metric.sum.data_points.add(as_int=value)
    return metric


def _histogram(name: str, attributes: dict[str, Any], counts: list[int],
               bounds: list[float] = BOUNDS, temporality: int = CUMULATIVE,
               minmax: tuple[float, float] | None = None) -> metrics_pb2.Metric:
    metric = metrics_pb2.Metric(name=name, unit="s")
    metric.histogram.aggregation_temporality = temporality
    point = metric.histogram.data_points.add(
        attributes=_kv(attributes), count=sum(counts), bucket_counts=counts,
        explicit_bounds=bounds)
    if minmax is not None:
        point.min, point.max = minmax
    return metric


def _summary(*requests: ExportMetricsServiceRequest) -> Any:
    store = ms.MetricStore()
    for request in requests:
        store.add(request)
    return ms.summarize(store.points())


def _counts(summary: Any) -> dict[tuple[str, str], int | None]:
    return {(row.task, row.state): row.count for row in summary.rows}


def test_latest_cumulative_point_per_stream_summed_across_writers() -> None:
    """Three exports of writer A, two of writer B (one arriving late and out of
    order): each stream counts its newest point once, the writers add up."""
    consumed = "messaging.client.consumed.messages"
    a = [
        _request("A", 1_000, _counter(consumed, (SUCCESS, 1), (FAILURE, 1))),
        _request("A", 2_000, _counter(consumed, (SUCCESS, 3), (FAILURE, 1))),
        _request("A", 3_000, _counter(consumed, (SUCCESS, 5), (FAILURE, 1))),
    ]
    b = [
        _request("B", 1_500, _counter(consumed, (SUCCESS, 2))),
        _request("B", 2_500, _counter(consumed, (SUCCESS, 4))),
    ]
    summary = _summary(a[0], b[0], a[1], b[1], a[2], b[0])
    assert _counts(summary) == {("process_order", "FAILURE"): 1, ("process_order", "SUCCESS"): 9}


def test_histograms_merge_across_writers_and_percentiles_interpolate() -> None:
    """Buckets of the newest point of each writer are added; p50 and p95 are
    interpolated linearly inside the bucket holding the rank (q * count)."""
    duration = "messaging.process.duration"
    summary = _summary(
        _request("A", 1_000, _histogram(duration, SUCCESS, [0, 1, 0, 0, 0, 0])),
        _request("A", 2_000, _histogram(duration, SUCCESS, [0, 2, 2, 0, 0, 0])),
        _request("B", 1_000, _histogram(duration, SUCCESS, [0, 0, 0, 4, 0, 0])),
    )
    (row,) = summary.rows
    # 8 values: 2 in (5, 10] ms, 2 in (10, 25] ms, 4 in (25, 50] ms.
    # p50: rank 4, the top of (10, 25] ms. p95: rank 7.6, 3.6 of the 4 in (25, 50] ms.
    assert row.count is None  # no consumed-messages metric in this data
    assert row.process == pytest.approx((0.025, 0.025 + 0.025 * 3.6 / 4), rel=1e-12)
    assert row.queue is None


def test_percentile_on_known_buckets() -> None:
    Buckets = ms.Buckets
    # (5, 10] ms holds 3: p50 is rank 1.5 of 3, halfway through the bucket.
    assert ms.percentile([Buckets((0.005, 0.01), (0, 3, 0))], 0.5) == pytest.approx(0.0075)
    # The first bucket starts at 0 for positive bounds: rank 0.5 of 1 in (0, 4].
    assert ms.percentile([Buckets((4.0,), (1, 0))], 0.5) == pytest.approx(2.0)
    # Narrowed to min/max: one value, min == max, whatever its bucket.
    one = Buckets(tuple(BOUNDS), (0, 0, 0, 0, 1, 0), 0.089, 0.089)
    assert ms.percentile([one], 0.5) == pytest.approx(0.089)
    assert ms.percentile([one], 0.95) == pytest.approx(0.089)
    # The overflow bucket interpolates up to the max when known, else is its bound.
    assert ms.percentile([Buckets((1.0,), (0, 2), 2.0, 4.0)], 0.5) == pytest.approx(3.0)
    assert ms.percentile([Buckets((1.0,), (0, 2))], 0.5) == pytest.approx(1.0)
    # Two histograms with different layouts: 2 values in (0, 1], 2 in (1, 3].
    mixed = [Buckets((1.0,), (2, 0)), Buckets((1.0, 3.0), (0, 2, 0))]
    assert ms.percentile(mixed, 0.75) == pytest.approx(2.0)
    assert ms.percentile([Buckets((1.0,), (0, 0))], 0.5) is None
    assert ms.percentile([], 0.5) is None


def test_delta_points_add_up() -> None:
    """Should a writer export deltas, its successive points are added instead."""
    consumed = "messaging.client.consumed.messages"
    duration = "messaging.process.duration"
    summary = _summary(
        _request("A", 1_000, _counter(consumed, (SUCCESS, 2), temporality=DELTA),
                 _histogram(duration, SUCCESS, [0, 2, 0, 0, 0, 0], temporality=DELTA)),
        _request("A", 2_000, _counter(consumed, (SUCCESS, 3), temporality=DELTA),
                 _histogram(duration, SUCCESS, [0, 0, 3, 0, 0, 0], temporality=DELTA)),
    )
    (row,) = summary.rows
    assert row.count == 5
    # 2 in (5, 10] ms, 3 in (10, 25] ms: p50 is rank 2.5, 0.5 of 3 into (10, 25].
    assert row.process[0] == pytest.approx(0.01 + 0.015 * 0.5 / 3)


def test_queue_time_without_state_applies_to_each_state_of_its_task() -> None:
    queue_time = "celery.message.queue_time"
    consumed = "messaging.client.consumed.messages"
    per_task = {k: v for k, v in SUCCESS.items() if k != "celery.task.state"}
    summary = _summary(_request(
        "A", 1_000, _counter(consumed, (SUCCESS, 2), (FAILURE, 1)),
        _histogram(queue_time, per_task, [0, 0, 4, 0, 0, 0], minmax=(0.011, 0.02)),
    ))
    assert {row.state: row.queue for row in summary.rows} == {
        "FAILURE": pytest.approx((0.0155, 0.011 + 0.009 * 0.95)),
        "SUCCESS": pytest.approx((0.0155, 0.011 + 0.009 * 0.95)),
    }
    assert not summary.queue_time_by_state


def test_worker_gauges_sum_across_writers_queue_length_newest_report() -> None:
    """Active, reserved and pool size are each worker's own: summed. The queue
    length is the broker's number, which each worker reports: the newest wins."""
    summary = _summary(
        _request("A", 1_000, _gauge("celery.queue.length", QUEUE, 7),
                 _up_down("celery.worker.tasks.active", 2),
                 _up_down("celery.worker.tasks.reserved", 5),
                 _up_down("celery.worker.pool.size", 2)),
        _request("A", 3_000, _gauge("celery.queue.length", QUEUE, 0),
                 _up_down("celery.worker.tasks.active", 0),
                 _up_down("celery.worker.tasks.reserved", 0),
                 _up_down("celery.worker.pool.size", 2)),
        _request("B", 2_000, _gauge("celery.queue.length", QUEUE, 3),
                 _up_down("celery.worker.tasks.active", 1),
                 _up_down("celery.worker.tasks.reserved", 1),
                 _up_down("celery.worker.pool.size", 4)),
    )
    assert [(q.system, q.queue, q.messages) for q in summary.queues] == [
        ("redis", "orders-demo", 0)]
    assert (summary.active, summary.reserved, summary.pool) == (1, 1, 6)
    assert summary.rows == []


def test_render_prints_the_table_and_n_a_for_what_is_missing() -> None:
    consumed = "messaging.client.consumed.messages"
    duration = "messaging.process.duration"
    summary = _summary(_request(
        "A", 1_000, _counter(consumed, (SUCCESS, 2), (FAILURE, 1)),
        _histogram(duration, SUCCESS, [0, 0, 2, 0, 0, 0], minmax=(0.012, 0.02)),
        _up_down("celery.worker.tasks.active", 0),
    ))
    assert ms.render(summary).splitlines() == [
        "Metrics (from the OTLP receiver)",
        "task           state     count  process p50/p95      queue p50/p95",
        "process_order  FAILURE       1  n/a                  n/a",
        "process_order  SUCCESS       2  16 ms / 20 ms        n/a",
        "p50/p95 estimated from histogram buckets; queue time per task, all states",
        "queue n/a    worker: 0 active, n/a reserved, pool n/a",
    ]
    assert ms.render(ms.summarize([])).splitlines()[2:] == [
        "n/a   (no task metrics received)",
        "p50/p95 estimated from histogram buckets; queue time per task, all states",
        "queue n/a    worker: n/a active, n/a reserved, pool n/a",
    ]


def test_sdk_exporters_into_the_receiver(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two SDK MeterProviders (two writers) export over OTLP/HTTP into the demo's
    receiver, cumulatively, several times each: the summary counts every record once."""
    for name in list(os.environ):
        if name.startswith("OTEL_"):  # headers, compression, temporality... from outside
            monkeypatch.delenv(name)
    store = ms.MetricStore()
    with otlp_receiver.OTLPReceiver(on_metrics=store.add) as receiver:
        writers = {}
        for writer in ("A", "B"):
            reader = PeriodicExportingMetricReader(
                OTLPMetricExporter(endpoint=receiver.http_endpoint + "/v1/metrics"),
                export_interval_millis=3_600_000)  # only force_flush and shutdown export
            provider = MeterProvider(
                metric_readers=[reader],
                resource=Resource.create({"service.name": "w", "service.instance.id": writer}),
                views=[View(instrument_name="messaging.process.duration",
                            aggregation=ExplicitBucketHistogramAggregation(BOUNDS))],
            )
            meter = provider.get_meter("otel_celery_headers")
            writers[writer] = (provider,
                               meter.create_counter("messaging.client.consumed.messages"),
                               meter.create_histogram("messaging.process.duration", unit="s"))

        def record(writer: str, seconds: float, attributes: dict[str, Any]) -> None:
            _, counter, histogram = writers[writer]
            counter.add(1, attributes)
            histogram.record(seconds, attributes)

        record("A", 0.007, SUCCESS)
        record("A", 0.020, SUCCESS)
        assert writers["A"][0].force_flush()
        record("A", 0.030, SUCCESS)
        record("B", 0.040, SUCCESS)
        record("B", 0.060, FAILURE)
        for _ in range(2):
            for provider, _, _ in writers.values():
                assert provider.force_flush()
        for provider, _, _ in writers.values():
            provider.shutdown()  # a last export each
        # A: 4 exports (3 flushes, shutdown), B: 3, each repeating its totals so far.
        assert store.exports == 7

    summary = ms.summarize(store.points())
    assert _counts(summary) == {("process_order", "FAILURE"): 1, ("process_order", "SUCCESS"): 4}
    rows = {row.state: row for row in summary.rows}
    # SUCCESS: A has 7, 20, 30 ms (min 7, max 30), B has 40 ms (min = max = 40).
    # p50: rank 2, reached at the top of (10, 25] ms. p95: rank 3.8, inside B's
    # single value at 40 ms (A's last bucket, narrowed to (25, 30], holds rank 3).
    assert rows["SUCCESS"].process == pytest.approx((0.025, 0.040))
    assert rows["FAILURE"].process == pytest.approx((0.060, 0.060))
