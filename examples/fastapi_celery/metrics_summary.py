"""What the demo's OTLP receiver got as metrics, summed up in a few lines.

    store = MetricStore()            # the receiver calls store.add(request) per export
    ...
    print(render(summarize(store.points())))

Three steps, each a pure function (unit-tested in tests/test_demo_metrics.py):

1. :func:`points_from_request` flattens an ``ExportMetricsServiceRequest`` into
   :class:`Point` s, each naming its *stream*: resource + scope + metric + attributes.
2. :func:`merge` keeps one point per stream. The SDK's default temporality is
   cumulative: every export repeats the total so far, so a stream's LATEST point is
   its value and adding successive exports would count a message once per export.
   (Delta points, if someone asks the SDK for them, are added up instead.)
3. :func:`summarize` combines the streams. Several writers export the same metric:
   the worker's main process and each pool child (a child is a new writer after
   every ``fork``: the SDK gives it its own ``service.instance.id``), so counts and
   histogram buckets are summed ACROSS streams. The queue length is the exception:
   it is the broker's number, which every worker consuming the queue reports, so
   the newest report wins instead of the sum.

Percentiles come from explicit-bucket histograms: the rank is interpolated linearly
inside its bucket (as Prometheus' ``histogram_quantile`` does), with the bucket
narrowed to the stream's recorded min and max, so they are estimates.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1 import metrics_pb2

__all__ = [
    "MetricStore",
    "Point",
    "Summary",
    "merge",
    "percentile",
    "points_from_request",
    "render",
    "summarize",
]

CONSUMED = "messaging.client.consumed.messages"
PROCESS_DURATION = "messaging.process.duration"
QUEUE_TIME = "celery.message.queue_time"
ACTIVE = "celery.worker.tasks.active"
RESERVED = "celery.worker.tasks.reserved"
POOL_SIZE = "celery.worker.pool.size"
QUEUE_LENGTH = "celery.queue.length"

TASK_NAME = "celery.task.name"
TASK_STATE = "celery.task.state"
SYSTEM = "messaging.system"
DESTINATION = "messaging.destination.name"

Attributes = tuple[tuple[str, Any], ...]
StreamKey = tuple[Attributes, str, str, Attributes]

# OTLP DataPointFlags: the point stands for "no value" (a stream that went away).
_NO_RECORDED_VALUE = 1
_DELTA = metrics_pb2.AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA


@dataclass(frozen=True)
class Buckets:
    """An explicit-bucket histogram point: ``counts`` has one more entry than
    ``bounds`` (the last bucket is everything above the last bound)."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    min: float | None = None
    max: float | None = None


@dataclass(frozen=True)
class Point:
    resource: Attributes
    scope: str
    metric: str
    attributes: Attributes
    time_ns: int
    value: float  # sums and gauges: the value; histograms: the count
    buckets: Buckets | None = None
    delta: bool = False

    @property
    def stream(self) -> StreamKey:
        return (self.resource, self.scope, self.metric, self.attributes)

    def attribute(self, name: str) -> Any:
        return dict(self.attributes).get(name)


# -- 1. decoding -----------------------------------------------------------------------


def _any_value(value: AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return tuple(_any_value(v) for v in value.array_value.values)
    if which == "kvlist_value":
        return tuple(sorted((kv.key, _any_value(kv.value)) for kv in value.kvlist_value.values))
    if which == "bytes_value":
        return value.bytes_value.hex()
    return getattr(value, which)


def _frozen(key_values: Iterable[KeyValue]) -> Attributes:
    return tuple(sorted((kv.key, _any_value(kv.value)) for kv in key_values))


def points_from_request(request: ExportMetricsServiceRequest) -> list[Point]:
    """Every data point of the request, sums, gauges and explicit-bucket histograms
    (exponential histograms and summaries are skipped: the SDK's defaults make none)."""
    points: list[Point] = []
    for resource_metrics in request.resource_metrics:
        resource = _frozen(resource_metrics.resource.attributes)
        for scope_metrics in resource_metrics.scope_metrics:
            scope = scope_metrics.scope.name
            for metric in scope_metrics.metrics:
                kind = metric.WhichOneof("data")
                if kind in ("sum", "gauge"):
                    data = metric.sum if kind == "sum" else metric.gauge
                    delta = kind == "sum" and metric.sum.aggregation_temporality == _DELTA
                    for number in data.data_points:
                        if number.flags & _NO_RECORDED_VALUE:
                            continue
                        value = number.as_double if number.WhichOneof("value") == "as_double" \
                            else number.as_int
                        points.append(Point(resource, scope, metric.name,
                                            _frozen(number.attributes), number.time_unix_nano,
                                            float(value), delta=delta))
                elif kind == "histogram":
                    delta = metric.histogram.aggregation_temporality == _DELTA
                    for hist in metric.histogram.data_points:
                        if hist.flags & _NO_RECORDED_VALUE or not hist.bucket_counts:
                            continue
                        buckets = Buckets(
                            tuple(hist.explicit_bounds), tuple(hist.bucket_counts),
                            hist.min if hist.HasField("min") else None,
                            hist.max if hist.HasField("max") else None,
                        )
                        points.append(Point(resource, scope, metric.name,
                                            _frozen(hist.attributes), hist.time_unix_nano,
                                            float(hist.count), buckets, delta))
    return points


# -- 2. one point per stream ------------------------------------------------------------


def _add(a: Point, b: Point) -> Point:
    """Two delta points of one stream as one."""
    buckets = a.buckets
    if a.buckets is not None and b.buckets is not None and a.buckets.bounds == b.buckets.bounds:
        lows = [m for m in (a.buckets.min, b.buckets.min) if m is not None]
        highs = [m for m in (a.buckets.max, b.buckets.max) if m is not None]
        buckets = Buckets(a.buckets.bounds,
                          tuple(x + y for x, y in zip(a.buckets.counts, b.buckets.counts)),
                          min(lows) if lows else None, max(highs) if highs else None)
    elif b.buckets is not None:
        return b  # the bucket layout changed: start over
    return replace(b, value=a.value + b.value, buckets=buckets)


def merge(streams: dict[StreamKey, Point], points: Iterable[Point]) -> None:
    """Fold ``points`` into ``streams`` (one point per stream), in place: a cumulative
    stream keeps its newest point, a delta stream adds its points up."""
    for point in points:
        known = streams.get(point.stream)
        if known is None:
            streams[point.stream] = point
        elif point.delta:
            streams[point.stream] = _add(known, point)
        elif point.time_ns >= known.time_ns:
            streams[point.stream] = point


class MetricStore:
    """Thread-safe: the receiver's HTTP/gRPC threads add, the demo reads. Memory
    grows with the number of streams, not with the number of exports."""

    def __init__(self) -> None:
        self._streams: dict[StreamKey, Point] = {}
        self._lock = threading.Condition()
        self.exports = 0

    def add(self, request: ExportMetricsServiceRequest) -> None:
        points = points_from_request(request)
        with self._lock:
            merge(self._streams, points)
            self.exports += 1
            self._lock.notify_all()

    def points(self) -> list[Point]:
        with self._lock:
            return list(self._streams.values())

    def wait_for(self, predicate: Callable[[list[Point]], bool], timeout: float) -> bool:
        """Wait until ``predicate(points())`` holds; False at the deadline."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not predicate(list(self._streams.values())):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._lock.wait(min(remaining, 0.5))
            return True


# -- 3. the summary ----------------------------------------------------------------------


def percentile(histograms: Iterable[Buckets], q: float) -> float | None:
    """The ``q`` quantile (0 < q < 1) of the values the histograms counted together,
    interpolated linearly within buckets; None if they counted nothing.

    Each bucket is an interval (bound below, bound above] holding its count spread
    evenly; narrowed to the histogram's min and max when known. Without a min the
    first bucket starts at 0 (durations); without a max the overflow bucket is its
    lower bound (nothing to interpolate towards)."""
    intervals: list[tuple[float, float, int]] = []
    for hist in histograms:
        first = 0.0 if hist.bounds and hist.bounds[0] > 0 else -math.inf
        for i, count in enumerate(hist.counts):
            if count <= 0:
                continue
            low = hist.bounds[i - 1] if i > 0 else first
            high = hist.bounds[i] if i < len(hist.bounds) else math.inf
            if hist.min is not None:
                low, high = max(low, hist.min), max(high, hist.min)
            if hist.max is not None:
                low, high = min(low, hist.max), min(high, hist.max)
            if high == math.inf:
                high = low  # the overflow bucket, no max known: its lower bound
            if low == -math.inf:
                low = high
            if math.isfinite(low) and math.isfinite(high):
                intervals.append((low, high, count))
    total = sum(count for _, _, count in intervals)
    if total == 0:
        return None
    rank = q * total

    def below(x: float) -> float:
        """How many values lie at or below x."""
        return sum(
            count if x >= high else count * (x - low) / (high - low) if x > low else 0.0
            for low, high, count in intervals
        )

    breakpoints = sorted({edge for low, high, _ in intervals for edge in (low, high)})
    previous = breakpoints[0]
    if below(previous) >= rank:
        return previous
    for point in breakpoints[1:]:
        reached = below(point)
        if reached >= rank:
            # Linear between the breakpoints, except for values piled exactly on
            # ``point`` (buckets narrowed to a single value by min == max).
            steps = sum(count for low, high, count in intervals if low == high == point)
            start, end = below(previous), reached - steps
            if rank >= end or end <= start:
                return point
            return previous + (point - previous) * (rank - start) / (end - start)
        previous = point
    return breakpoints[-1]


@dataclass(frozen=True)
class Row:
    task: str
    state: str
    count: int | None  # None: no consumed-messages metric received
    process: tuple[float, float] | None  # p50, p95 in seconds
    queue: tuple[float, float] | None


@dataclass(frozen=True)
class QueueLength:
    system: str
    queue: str
    messages: int


@dataclass
class Summary:
    rows: list[Row] = field(default_factory=list)
    queues: list[QueueLength] = field(default_factory=list)
    active: int | None = None
    reserved: int | None = None
    pool: int | None = None
    queue_time_by_state: bool = False  # False: queue times per task, all states

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _p50_p95(histograms: list[Buckets]) -> tuple[float, float] | None:
    p50, p95 = percentile(histograms, 0.5), percentile(histograms, 0.95)
    return None if p50 is None or p95 is None else (p50, p95)


def _total(points: list[Point], metric: str) -> int | None:
    values = [p.value for p in points if p.metric == metric]
    return round(sum(values)) if values else None


def _belongs(point: Point, task: str, state: str) -> bool:
    """The point counts for this row: same task, and same state unless it has none
    (queue time is recorded when a task starts, before its outcome is known)."""
    if str(point.attribute(TASK_NAME)) != task:
        return False
    own_state = point.attribute(TASK_STATE)
    return own_state is None or str(own_state) == state


def summarize(points: Iterable[Point]) -> Summary:
    """The demo's table from one point per stream (:func:`merge`'s result)."""
    points = list(points)
    consumed = [p for p in points if p.metric == CONSUMED]
    durations = [p for p in points if p.metric == PROCESS_DURATION and p.buckets]
    waits = [p for p in points if p.metric == QUEUE_TIME and p.buckets]
    keys = sorted({(str(p.attribute(TASK_NAME)), str(p.attribute(TASK_STATE)))
                   for p in consumed + durations})
    summary = Summary(queue_time_by_state=any(p.attribute(TASK_STATE) for p in waits))
    for task, state in keys:
        count = sum(p.value for p in consumed if _belongs(p, task, state)) if consumed else None
        summary.rows.append(Row(
            task, state, None if count is None else round(count),
            _p50_p95([p.buckets for p in durations if p.buckets and _belongs(p, task, state)]),
            _p50_p95([p.buckets for p in waits if p.buckets and _belongs(p, task, state)]),
        ))

    # Queue length: per queue, the newest report; within one writer, the sum of its
    # streams for that queue (were a writer to split a queue by another attribute).
    newest: dict[tuple[str, str], tuple[int, float]] = {}
    by_writer: dict[tuple[str, str, Attributes], list[Point]] = {}
    for p in points:
        if p.metric == QUEUE_LENGTH:
            key = (str(p.attribute(SYSTEM)), str(p.attribute(DESTINATION)))
            by_writer.setdefault((*key, p.resource), []).append(p)
    for (system, queue, _), mine_ in by_writer.items():
        when = max(p.time_ns for p in mine_)
        if (system, queue) not in newest or when >= newest[(system, queue)][0]:
            newest[(system, queue)] = (when, sum(p.value for p in mine_))
    summary.queues = [QueueLength(system, queue, round(value))
                      for (system, queue), (_, value) in sorted(newest.items())]
    summary.active = _total(points, ACTIVE)
    summary.reserved = _total(points, RESERVED)
    summary.pool = _total(points, POOL_SIZE)
    return summary


def _ms(seconds: float) -> str:
    ms = seconds * 1000
    if ms < 1:
        return f"{ms:.2f} ms"
    if ms < 10:
        return f"{ms:.1f} ms"
    if ms < 1000:
        return f"{ms:.0f} ms"
    return f"{seconds:.2f} s"


def _pair(values: tuple[float, float] | None) -> str:
    return "n/a" if values is None else f"{_ms(values[0])} / {_ms(values[1])}"


def _n(value: int | None) -> str:
    return "n/a" if value is None else str(value)


def render(summary: Summary, title: str = "Metrics (from the OTLP receiver)") -> str:
    task_w = max([len("task"), *(len(row.task) for row in summary.rows)])
    header = f"{'task':<{task_w}}  {'state':<9} {'count':>5}  {'process p50/p95':<20} queue p50/p95"
    lines = [title, header]
    for row in summary.rows:
        lines.append(f"{row.task:<{task_w}}  {row.state:<9} {_n(row.count):>5}  "
                     f"{_pair(row.process):<20} {_pair(row.queue)}".rstrip())
    if not summary.rows:
        lines.append(f"{'n/a':<{task_w}}  (no task metrics received)")
    note = "p50/p95 estimated from histogram buckets"
    if not summary.queue_time_by_state:
        note += "; queue time per task, all states"
    lines.append(note)
    queues = ", ".join(f"{q.queue} ({q.system}): {q.messages} waiting" for q in summary.queues)
    lines.append(f"queue {queues or 'n/a'}    worker: {_n(summary.active)} active, "
                 f"{_n(summary.reserved)} reserved, pool {_n(summary.pool)}")
    return "\n".join(lines)
