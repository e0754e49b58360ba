"""Pool children: flush spans and metrics before the child exits.

billiard ends a pool child with ``os._exit`` (after ``worker_max_tasks_per_child``
tasks, or at shutdown), so ``atexit`` never runs and a ``BatchSpanProcessor``'s
buffer dies with the process. Celery sends ``worker_process_shutdown`` in the child
just before that exit; we flush there. Open upstream as
open-telemetry/opentelemetry-python-contrib#4916.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import metrics, trace

from ._guard import report


class Flusher:
    def __init__(
        self, tracer_provider: Any | None, meter_provider: Any | None, timeout_ms: int
    ) -> None:
        # Providers passed to instrument() win; otherwise whatever is global at exit
        # time (instrument() may run before the SDK is configured).
        self._tracer_provider = tracer_provider
        self._meter_provider = meter_provider
        self._timeout_ms = timeout_ms

    def on_process_shutdown(self, **_: Any) -> None:
        if self._timeout_ms <= 0:
            return
        for provider in (
            self._tracer_provider or trace.get_tracer_provider(),
            self._meter_provider or metrics.get_meter_provider(),
        ):
            flush = getattr(provider, "force_flush", None)
            if flush is None:
                continue
            try:
                flush(timeout_millis=self._timeout_ms)
            except Exception as exc:  # noqa: BLE001
                report("flush at worker_process_shutdown", exc)
