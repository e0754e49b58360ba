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

import importlib
import os
import threading
import time
from typing import Any

from opentelemetry import metrics, trace

from . import endings
from ._guard import report

#: Forks between this process and the one that imported this module: 0 there, one
#: more in each child (counted by a fork hook). Per-process decisions are cached
#: against it rather than against os.getpid(), a system call, paid on every task.
#: Only forks through os.fork() run the hook; billiard's pool forks that way.
generation = 0


def _count_fork() -> None:
    global generation
    generation += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_count_fork)

_child_of: tuple[int, bool] | None = None  # (generation, answer) of in_pool_child()

# The metrics SDK does not reset its locks after fork (open-telemetry/opentelemetry-python
# #4626, closed unmerged). A pool child forked while the main process's reader thread
# was collecting or exporting (health.py makes the main process export on every
# interval) inherits those locks held, by a thread that does not exist in the child:
# its flush at exit would wait forever. Right after fork the child has no other
# thread, so new locks are safe. The flush at exit is also bounded (on_process_shutdown)
# for any lock this does not know about.
_current: Flusher | None = None
_fork_hook = False


def _after_fork_in_child() -> None:
    flusher = _current
    if flusher is None:
        return
    try:
        provider = flusher._meter_provider or metrics.get_meter_provider()
        consumer = getattr(provider, "_measurement_consumer", None)
        if consumer is not None and hasattr(consumer, "_lock"):
            consumer._lock = threading.Lock()
        config = getattr(provider, "_sdk_config", None)
        readers: Any = getattr(provider, "_metric_readers", None)  # SDK 1.45
        for reader in readers or getattr(config, "metric_readers", None) or ():  # 1.28
            if hasattr(reader, "_export_lock"):
                reader._export_lock = threading.Lock()
    except Exception as exc:  # noqa: BLE001
        report("metric locks after fork", exc)


# Modules the OTLP/HTTP exporters import lazily, on their first request: requests'
# get_netrc_auth runs `from netrc import ...` on every request. Python's per-module
# import locks are not reset after fork: a pool child forked while the main process's
# metric-export thread was inside that first `import netrc` inherits the lock held by
# a thread it does not have, and its first span export waits on it forever (seen in
# the demo under load with --max-tasks-per-child 1: a child's exit flush stuck in
# `_lock_unlock_module` for netrc, its spans lost). Imported once, before any fork,
# nothing is left to lock.
_IMPORTED_BY_FIRST_EXPORT = ("netrc",)


def import_ahead_of_fork() -> None:
    for name in _IMPORTED_BY_FIRST_EXPORT:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001,S110 - absent: then nothing imports it either
            pass


def in_pool_child() -> bool:
    """Whether this process is a prefork pool child (cached per process: see generation)."""
    global _child_of
    if _child_of is not None and _child_of[0] == generation:
        return _child_of[1]
    try:
        from billiard.process import current_process

        known = bool(current_process().name.startswith("ForkPoolWorker"))
    except Exception:  # noqa: BLE001
        known = False
    _child_of = (generation, known)
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
        self._generation = -1  # the process task_done() decided for
        self._kick: threading.Event | None = None
        self._stopped = False
        global _current, _fork_hook
        _current = self
        # instrument() runs in the worker's main process before the pool forks.
        import_ahead_of_fork()
        if not _fork_hook and hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=_after_fork_in_child)  # once: it cannot be undone
            _fork_hook = True

    def stop(self) -> None:
        """Called by uninstrument(): the background thread ends after its next wake-up."""
        self._stopped = True
        global _current
        if _current is self:
            _current = None
        if self._kick is not None:
            self._kick.set()

    # -- after every task (consumer.py calls this from task_postrun) ---------------

    def task_done(self) -> bool:
        """Wake the flushing thread; False when this process has none (not a pool
        child, or flushing off): the consumer then stops calling, until a fork."""
        if self._generation != generation:
            # First task in this process (or first after a fork): decide once.
            self._generation = generation
            self._kick = None
            # flush_timeout_ms=0 disables flushing in pool children altogether: after
            # tasks as at exit (no thread is started).
            if self._interval > 0 and self._timeout_ms > 0 and in_pool_child():
                self._kick = threading.Event()
                threading.Thread(
                    target=self._loop, args=(self._kick,), name="otel-celery-flush", daemon=True
                ).start()
        if self._kick is None:
            return False
        self._kick.set()
        return True

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
                    mark = endings.before_flush()
                    if flush(timeout_millis=self._timeout_ms):
                        endings.flushed(mark)
                except Exception as exc:  # noqa: BLE001
                    report("flush after task", exc)
            time.sleep(self._interval)

    # -- worker_process_shutdown --------------------------------------------------

    def on_process_shutdown(self, **_: Any) -> None:
        if self._timeout_ms <= 0:
            return
        # From a daemon thread, waited for at most the timeout: a lock held since the
        # fork (see _after_fork_in_child) must not keep the child from exiting;
        # billiard's os._exit ends the child, and that thread, either way.
        flushing = threading.Thread(
            target=self._flush_providers, name="otel-celery-exit-flush", daemon=True
        )
        flushing.start()
        flushing.join(self._timeout_ms / 1000.0)

    def _flush_providers(self) -> None:
        spans = self._tracer_provider or trace.get_tracer_provider()
        mark = endings.before_flush()  # what the span flush below covers
        for provider in (spans, self._meter_provider or metrics.get_meter_provider()):
            flush = getattr(provider, "force_flush", None)
            if flush is None:
                continue
            try:
                if flush(timeout_millis=self._timeout_ms) and provider is spans:
                    endings.flushed(mark)
            except Exception as exc:  # noqa: BLE001
                report("flush at worker_process_shutdown", exc)
