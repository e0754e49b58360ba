"""Metrics of worker subprocesses as JSON lines: one line per exported data point.

A worker's main process and its pool children all append to one file. Each line says
which process wrote it (``pid``) and under which resource, so a test can tell one
writer per stream from several (the single-writer promise of issue 10).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    MetricExporter,
    MetricExportResult,
    MetricsData,
)

from tests.support.jsonlines import read_json_lines


def _exemplars(point: Any) -> list[dict[str, str]]:
    return [
        {"trace_id": format(e.trace_id, "032x"), "span_id": format(e.span_id, "016x")}
        for e in (getattr(point, "exemplars", None) or ())
        if getattr(e, "trace_id", None)
    ]


def _point(point: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"attributes": dict(point.attributes or {}), "time": point.time_unix_nano}
    if hasattr(point, "bucket_counts"):
        row.update(kind="histogram", count=point.count, sum=point.sum,
                   bounds=list(point.explicit_bounds), buckets=list(point.bucket_counts))
    else:
        row.update(kind="number", value=point.value)
    row["exemplars"] = _exemplars(point)
    return row


class JsonLinesMetricExporter(MetricExporter):
    """Cumulative points (the SDK default), appended with one write per export."""

    def __init__(self, path: str) -> None:
        super().__init__(preferred_temporality={})
        self._path = path

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **_: Any) -> MetricExportResult:
        lines = []
        pid = os.getpid()
        for rm in metrics_data.resource_metrics:
            resource = dict(rm.resource.attributes)
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    for point in metric.data.data_points:
                        row = {"pid": pid, "resource": resource, "scope": sm.scope.name,
                               "name": metric.name, "unit": metric.unit, **_point(point)}
                        lines.append(json.dumps(row, default=str) + "\n")
        if lines:
            fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, "".join(lines).encode())
            finally:
                os.close(fd)
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **_: Any) -> None:
        pass


def read_points(path: str | Path) -> list[dict[str, Any]]:
    return read_json_lines(path)


def stream_key(row: dict[str, Any]) -> tuple[str, str, str, str]:
    """What identifies a stream to a backend: resource, scope, name, attributes."""
    return (
        json.dumps(row["resource"], sort_keys=True),
        row["scope"],
        row["name"],
        json.dumps(row["attributes"], sort_keys=True),
    )


def latest(rows: Iterable[dict[str, Any]]) -> dict[tuple[str, str, str, str], dict[str, Any]]:
    """The latest point of each stream (cumulative: the latest is the total)."""
    out: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    for row in rows:
        key = stream_key(row)
        if key not in out or row["time"] >= out[key]["time"]:
            out[key] = row
    return out


def writers(rows: Iterable[dict[str, Any]]) -> dict[tuple[str, str, str, str], set[int]]:
    """The processes that wrote each stream (one is the promise)."""
    out: dict[tuple[str, str, str, str], set[int]] = {}
    for row in rows:
        out.setdefault(stream_key(row), set()).add(row["pid"])
    return out


def total(rows: Iterable[dict[str, Any]], name: str, **attributes: Any) -> float:
    """Sum over streams of ``name`` whose attributes include ``attributes``: counts for
    a histogram, values for a sum; each stream's latest point."""
    result = 0.0
    for row in latest(rows).values():
        if row["name"] != name:
            continue
        if any(row["attributes"].get(k) != v for k, v in attributes.items()):
            continue
        result += row["count"] if row["kind"] == "histogram" else row["value"]
    return result
