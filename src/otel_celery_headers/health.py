"""Worker health, observed in the worker's main process: tasks executing, tasks
prefetched and waiting, pool size, and (queue_length.py) messages waiting in the broker.

Where the numbers come from: ``celery.worker.state``, the main process's own
bookkeeping, and the pool object. ``task_reserved`` adds a received request to
``reserved_requests``; ``task_accepted`` (a pool child started it) adds it to
``active_requests`` without removing it from the reserved set; ``task_ready`` removes
it from both. So "reserved and not started" is reserved minus active, as Celery's
``inspect reserved`` computes it. With ``-c 2`` and the default prefetch multiplier (4)
that reads 2 active and 8 reserved: a prefetched message is acknowledged when a child
starts it, which frees its prefetch slot.

Why the callbacks are instant and guarded by pid: the SDK holds a lock while it runs
observable callbacks and does not reset it after ``fork``, and prefork children inherit
the provider and these callbacks. A callback only reads numbers in memory, and returns
nothing in any process other than the one that sent ``worker_init``; the children's
own state is empty anyway.

Once the worker has stopped (``worker_shutdown``, sent after the pool was joined on a
warm shutdown; or its blueprint in state TERMINATE, which a cold shutdown and an
embedded worker reach without that signal) all three read 0, so the last export at
exit says the worker holds nothing. After a warm shutdown Celery's sets are empty
already (5.3 and 5.7: ``Consumer.on_close`` drops the prefetched requests, whose
messages go back to the broker, and ``task_ready`` the finished ones); a cold shutdown
kills running tasks without ``task_ready``, and the pool's size is gone with the pool.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from celery.bootsteps import TERMINATE
from opentelemetry.metrics import Meter, Observation

from . import attributes as attrs
from ._current import Current
from ._guard import report
from .options import HostnameRule
from .queue_length import SYSTEMS, QueueLengths

logger = logging.getLogger("otel_celery_headers")

TASKS_ACTIVE = "celery.worker.tasks.active"
TASKS_RESERVED = "celery.worker.tasks.reserved"
POOL_SIZE = "celery.worker.pool.size"
QUEUE_LENGTH = "celery.queue.length"
#: Every metric whose points name the worker (celery.worker.hostname): these four only.
HEALTH_METRICS = (TASKS_ACTIVE, TASKS_RESERVED, POOL_SIZE, QUEUE_LENGTH)

_DEFAULT_INTERVAL_MS = 60_000


def export_interval_s() -> float:
    """The SDK's metric export interval (OTEL_METRIC_EXPORT_INTERVAL, ms; 60 s default)."""
    try:
        millis = float(os.environ.get("OTEL_METRIC_EXPORT_INTERVAL") or _DEFAULT_INTERVAL_MS)
    except ValueError:
        millis = _DEFAULT_INTERVAL_MS
    return max(millis if millis > 0 else _DEFAULT_INTERVAL_MS, 100.0) / 1000.0


def _task_counts() -> tuple[int, int] | None:
    """(executing, reserved and not started), or None if not readable right now."""
    from celery.worker import state

    # The event loop changes these WeakSets while the SDK's thread copies them; a copy
    # that raced is simply taken again.
    for _ in range(3):
        try:
            active = set(state.active_requests)
            return len(active), len(set(state.reserved_requests) - active)
        except RuntimeError:  # "Set changed size during iteration"
            continue
    return None


def _stopped(controller: Any) -> bool:
    return bool(getattr(getattr(controller, "blueprint", None), "state", None) == TERMINATE)


def _queue_names(controller: Any) -> list[str] | None:
    """The queues the worker consumes now (add_consumer / cancel_consumer change them);
    None once the worker has stopped."""
    if _stopped(controller):
        return None
    task_consumer = getattr(getattr(controller, "consumer", None), "task_consumer", None)
    queues = getattr(task_consumer, "queues", None) or ()
    return [str(queue.name) for queue in list(queues) if getattr(queue, "name", None)]


def worker_attributes(hostname: str, rule: HostnameRule) -> dict[str, str]:
    """celery.worker.hostname for metric points, by the metrics_worker_hostname rule.

    A Kubernetes pod names its worker after itself (``celery@worker-7d9f8b6c5-x2x7q``):
    every deploy, every rescheduled pod, makes new series of every health metric.
    "drop" leaves the worker to the resource (service.instance.id); a callable maps
    the name to a bounded one (e.g. the Deployment's name). A callable that raises or
    answers anything but a non-empty str drops the attribute: falling back to the raw
    name would bring back the unbounded series the user asked to be rid of.
    """
    if rule == "keep":
        return {attrs.CELERY_WORKER_HOSTNAME: hostname}
    if rule == "drop":
        return {}
    try:
        answer = rule(hostname)
    except Exception as exc:  # noqa: BLE001 - a user callable must not break the metrics
        report("metrics_worker_hostname callable", exc)
        return {}
    if not isinstance(answer, str) or not answer:
        report(
            "metrics_worker_hostname callable's answer",
            ValueError(f"it returned {answer!r} for {hostname!r}, not a non-empty str: dropped"),
        )
        return {}
    return {attrs.CELERY_WORKER_HOSTNAME: answer}


class Health:
    def __init__(self, queue_length: bool, hostname_rule: HostnameRule = "keep") -> None:
        self._queue_length = queue_length
        self._hostname_rule = hostname_rule
        self._worker_attributes: dict[str, str] = {}
        self._interval = export_interval_s()
        self._pid = 0  # the worker's main process, once worker_init was sent there
        self._controller: Any = None
        self._shut_down = False
        self._closed = False
        self._lengths: QueueLengths | None = None

    # -- signals (main process) ------------------------------------------------------

    def on_worker_init(self, sender: Any = None, **_: Any) -> None:
        """worker_init: sent by the WorkController, in the main process, before the pool forks."""
        try:
            self._stop_lengths()
            self._pid = os.getpid()
            self._controller = sender
            self._shut_down = False
            # Once per worker: its node name does not change while it runs. A dict
            # never mutated, shared by every observation.
            self._worker_attributes = worker_attributes(
                str(getattr(sender, "hostname", "")), self._hostname_rule
            )
            app = getattr(sender, "app", None)
            if self._queue_length and app is not None and attrs.messaging_system(app) in SYSTEMS:
                self._lengths = QueueLengths(app, lambda: _queue_names(sender), self._interval)
                self._lengths.start()
        except Exception as exc:  # noqa: BLE001
            report("worker_init (health)", exc)

    def on_worker_ready(self, sender: Any = None, **_: Any) -> None:
        """worker_ready (sender: the Consumer), main process: instrument() may have run
        inside a worker_init receiver, too late to receive that signal itself."""
        if self._controller is None and getattr(sender, "controller", None) is not None:
            self.on_worker_init(sender=sender.controller)

    def on_worker_shutdown(self, **_: Any) -> None:
        self._shut_down = True
        self._stop_lengths()

    def close(self) -> None:
        """uninstrument(): instruments stay in the SDK, so they go quiet instead."""
        self._closed = True
        self._stop_lengths()

    def _stop_lengths(self) -> None:
        lengths, self._lengths = self._lengths, None
        if lengths is not None:
            lengths.stop()

    # -- what the callbacks read -----------------------------------------------------

    def _here(self) -> bool:
        return not self._closed and self._pid == os.getpid() and self._controller is not None

    def _gone(self) -> bool:
        return self._shut_down or _stopped(self._controller)

    def _worker(self) -> dict[str, str]:
        # The node name (`celery@host`), one per worker: what Flower and celery-exporter
        # label by, so "active per worker" needs no join with resource attributes, and
        # two workers under one resource (SDKs before service.instance.id) stay apart.
        # Unless metrics_worker_hostname says otherwise (worker_attributes).
        return self._worker_attributes

    def active(self) -> list[Observation]:
        if not self._here():
            return []
        counts = (0, 0) if self._gone() else _task_counts()
        return [] if counts is None else [Observation(counts[0], self._worker())]

    def reserved(self) -> list[Observation]:
        if not self._here():
            return []
        counts = (0, 0) if self._gone() else _task_counts()
        return [] if counts is None else [Observation(counts[1], self._worker())]

    def pool_size(self) -> list[Observation]:
        if not self._here():
            return []
        if self._gone():
            return [Observation(0, self._worker())]
        try:
            # prefork: its process count (--autoscale grows and shrinks it);
            # threads, gevent, eventlet, solo: the concurrency limit.
            return [Observation(int(self._controller.pool.num_processes), self._worker())]
        except Exception:  # noqa: BLE001 - no pool yet (or already gone): nothing to say
            return []

    def queue_length(self) -> list[Observation]:
        lengths = self._lengths
        if not self._here() or lengths is None or self._gone():
            return []
        system = attrs.messaging_system(self._controller.app)
        return [
            Observation(
                count,
                {
                    attrs.MESSAGING_SYSTEM: system,
                    attrs.MESSAGING_DESTINATION_NAME: queue,
                    **self._worker(),
                },
            )
            for queue, count in lengths.lengths.items()
        ]


# The SDK cannot remove an instrument: its callbacks read the current Health (_current.py).
_holder: Current[Health] = Current("worker health metrics")
activate = _holder.activate
_callback = _holder.callback


# (name, what Health reads, unit, description, gauge?). UpDownCounters where a sum
# across workers means something; the queue length is a gauge: every worker consuming
# a queue reports the same queue, and a sum would overcount it.
_INSTRUMENTS: tuple[tuple[str, Callable[[Health], list[Observation]], str, str, bool], ...] = (
    (TASKS_ACTIVE, Health.active, "{task}", "Tasks a worker is executing now.", False),
    (TASKS_RESERVED, Health.reserved, "{task}",
     "Tasks a worker received (prefetched) and has not started yet.", False),
    (POOL_SIZE, Health.pool_size, "{process}",
     "Pool processes (prefork) or threads / greenlets of a worker.", False),
    (QUEUE_LENGTH, Health.queue_length, "{message}",
     "Messages waiting in the broker in a queue the worker consumes.", True),
)


def create_instruments(meter: Meter) -> None:
    """The observable instruments of ``_INSTRUMENTS``, each reading the active Health."""
    for name, read, unit, description, gauge in _INSTRUMENTS:
        create = meter.create_observable_gauge if gauge else meter.create_observable_up_down_counter
        create(name, callbacks=[_callback(read)], unit=unit, description=description)
