"""A log-record exporter writing JSON lines to a file, for workers in other processes."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.support.jsonlines import read_json_lines

try:
    from opentelemetry.sdk._logs.export import LogRecordExporter, LogRecordExportResult
except ImportError:  # SDK before 1.39 (celery53 pins 1.28): the same classes, older names
    from opentelemetry.sdk._logs.export import LogExporter as LogRecordExporter
    from opentelemetry.sdk._logs.export import LogExportResult as LogRecordExportResult


class JsonLinesLogExporter(LogRecordExporter):
    def __init__(self, path: str) -> None:
        self._path = path

    def export(self, batch: Sequence[Any]) -> LogRecordExportResult:
        lines = []
        for item in batch:
            record = getattr(item, "log_record", item)
            lines.append(json.dumps({
                "body": str(record.body),
                "trace_id": format(record.trace_id or 0, "032x"),
                "span_id": format(record.span_id or 0, "016x"),
                "pid": os.getpid(),
            }) + "\n")
        fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, "".join(lines).encode())
        finally:
            os.close(fd)
        return LogRecordExportResult.SUCCESS

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True

    def shutdown(self) -> None:
        pass


def read_log_records(path: str | Path) -> list[dict[str, Any]]:
    return read_json_lines(path)