"""Pool children: get spans out before the child can vanish.

billiard ends a pool child with ``os._exit`` (after ``worker_max_tasks_per_child``
tasks, or at shutdown), so ``atexit`` never runs and a ``BatchSpanProcessor``'s
buffer dies with the process. Celery sends ``worker_process_shutdown`` in the child
just before that exit; we flush there. Open upstream as
open-telemetry/opentelemetry-python-contrib#4916.

A child can also be killed without warning: a hard time limit sends SIGTERM then
SIGKILL (billiard ``_trywaitkill``), the kernel's OOM killer sends SIGKILL. Spans of
tasks the child had already finished would die in its buffer. So after a task ends
in a pool child, a background thread asks the tracer provider to export, at most
once per ``child_flush_interval_ms``: the task never waits for the export, under load
exports still batch, and a finished task's span is exported within that interval.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from opentelemetry import metrics, trace

from ._guard import report

_child_of: dict[int, bool] = {}


def in_pool_child() -> bool:
    """Whether this process is a prefork pool child (cached per pid: forks change it)."""
    pid = os.getpid()
    known = _child_of.get(pid)
    if known is None:
        try:
            from billiard.process import current_process

            known = bool(current_process().name.startswith("ForkPoolWorker"))
        except Exception:  # noqa: BLE001
            known = False
        _child_of.clear()
        _child_of[pid] = known
    return known


class Flusher:
    def __init__(
        self,
        tracer_provider: Any | None,
        meter_provider: Any | None,
        timeout_ms: int,
        interval_ms: int,
    ) -> None:
        # Providers passed to instrument() win; otherwise whatever is global when
        # needed (instrument() may run before the SDK is configured).
        self._tracer_provider = tracer_provider
        self._meter_provider = meter_provider
        self._timeout_ms = timeout_ms
        self._interval = interval_ms / 1000.0
        self._pid = 0
        self._kick: threading.Event | None = None
        self._stopped = False

    def stop(self) -> None:
        """Called by uninstrument(): the background thread ends after its next wake-up."""
        self._stopped = True
        if self._kick is not None:
            self._kick.set()

    # -- after every task (consumer.py calls this from task_postrun) ---------------

    def task_done(self) -> None:
        pid = os.getpid()
        if pid != self._pid:
            # First task in this process (or first after a fork): decide once.
            self._pid = pid
            self._kick = None
            # flush_timeout_ms=0 disables flushing in pool children altogether: after
            # tasks as at exit (no thread is started).
            if self._interval > 0 and self._timeout_ms > 0 and in_pool_child():
                self._kick = threading.Event()
                threading.Thread(
                    target=self._loop, args=(self._kick,), name="otel-celery-flush", daemon=True
                ).start()
        if self._kick is not None:
            self._kick.set()

    def _loop(self, kick: threading.Event) -> None:
        while True:
            kick.wait()
            if self._stopped:
                return
            kick.clear()
            provider = self._tracer_provider or trace.get_tracer_provider()
            flush = getattr(provider, "force_flush", None)
            if flush is not None:
                try:
                    flush(timeout_millis=self._timeout_ms)
                except Exception as exc:  # noqa: BLE001
                    report("flush after task", exc)
            time.sleep(self._interval)

    # -- worker_process_shutdown --------------------------------------------------

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
