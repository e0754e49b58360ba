"""The ``celery beat`` process: a dead-man's switch per schedule entry.

Three instruments, each with ``celery.beat.entry`` and ``celery.task.name`` (bounded:
the schedule's entries, never a task id):

- ``celery.beat.lateness`` (histogram, s): how long after its due time each send went
  out. The due time is the entry's schedule read against its *previous* run
  (``schedule.remaining_estimate(last_run_at)``, negative once due), taken before the
  send: every scheduler we support (Celery's own, django-celery-beat's
  ``DatabaseScheduler``, celery-redbeat) reaches ``Scheduler.apply_async`` with the
  entry as it was when found due (Celery's ``tick`` reserves the next entry first and
  sends the old one; redbeat passes ``advance=True`` and reserves inside the call).
  Aware datetimes throughout, so a ``timezone`` other than UTC changes nothing.
- ``celery.beat.next_run_time`` (gauge, s since the epoch): when the entry is due
  next. Set after each send, and for every entry whenever Celery's scheduler builds
  its heap (at start and whenever the schedule changed: django-celery-beat edits);
  an entry the heap no longer holds is forgotten, so a deleted entry does not alarm.
  redbeat keeps its heap in Redis and has no such build: there an entry is known from
  its first send in this process.
- ``celery.beat.last_send_time`` (gauge, s since the epoch): this process's last
  successful send of the entry.

"Missed" is ``time() - next_run_time > grace``, "late" a quantile of lateness, and
"beat is gone" the gauges' absence (``docs/dashboards.md`` has the rules).

State is two small dicts written by the scheduler's thread and read by the SDK's
collection thread; a reader copies under a lock. Capped at ``MAX_ENTRIES`` names (a
schedule is configuration, but a runaway generator of entry names must not grow
memory or series without bound).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry.metrics import Histogram, Meter, Observation

from . import attributes as attrs
from ._current import Current
from ._guard import report
from .metrics import histogram

#: On a message `celery beat` sent: the schedule entry's name, so the worker's span and
#: delivery metrics can say which entry a task came from (Celery's own
#: ``celery_beat_task`` header, 5.5+, says only that beat sent it).
ENTRY_HEADER = "otel_celery_beat_entry"
#: Entry names are configuration, but a header is input: long ones are cut.
_MAX_ENTRY_CHARS = 200

LATENESS = "celery.beat.lateness"
NEXT_RUN_TIME = "celery.beat.next_run_time"
LAST_SEND_TIME = "celery.beat.last_send_time"

MAX_ENTRIES = 1000
# From "on time" to a day late: a beat down overnight still lands in a bucket. 100 is
# the shipped alert's threshold (CeleryBeatEntryLate, le="100"): also a boundary of the
# SDK's default buckets, which SDKs that ignore the advisory (1.28) use instead.
_LATENESS_BUCKETS = [0.1, 0.5, 1, 5, 10, 30, 60, 100, 300, 900, 1800, 3600, 7200, 21600, 86400]


def _entry_attributes(entry: Any) -> dict[str, str]:
    return {
        attrs.CELERY_BEAT_ENTRY: str(entry.name),
        attrs.CELERY_TASK_NAME: str(getattr(entry, "task", "") or ""),
    }


def entry_of(request: Any) -> str | None:
    """The beat entry a delivery came from (``task.request`` or message headers read as
    attributes, where Celery puts top-level headers); None for any other message."""
    value = getattr(request, ENTRY_HEADER, None)
    if type(value) is not str:
        return None
    return value if len(value) <= _MAX_ENTRY_CHARS else value[:_MAX_ENTRY_CHARS]


def lateness(entry: Any) -> float | None:
    """Seconds since ``entry`` was due (0 when on time or never run); None if unknown."""
    last = getattr(entry, "last_run_at", None)
    if last is None:
        return 0.0  # never run: due at once, by definition (redbeat's new entries)
    schedule = entry.schedule
    tz = getattr(schedule, "tz", None)
    if tz is not None and getattr(last, "tzinfo", None) is not None:
        # In the schedule's own zone, as django-celery-beat's is_due does: Celery 5.3's
        # crontab reads an aware time's fields in whatever zone it comes (a database's
        # UTC), and would put a 10:30 Asia/Kolkata run at 10:30 UTC.
        last = last.astimezone(tz)
    remaining = schedule.remaining_estimate(last)
    if remaining is None:  # a schedule with no further run (redbeat's solar edge cases)
        return None
    late = -remaining.total_seconds()
    return late if late > 0.0 else 0.0  # beat sends ~10 ms early on purpose (adjust())


def next_run_in(entry: Any) -> float | None:
    """Seconds from now until ``entry`` is due after a send happening now."""
    schedule = entry.schedule
    remaining = schedule.remaining_estimate(schedule.now())
    return None if remaining is None else max(remaining.total_seconds(), 0.0)


class BeatMonitor:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        # name -> (value, attributes)
        self._next: dict[str, tuple[float, dict[str, str]]] = {}
        self._last: dict[str, tuple[float, dict[str, str]]] = {}
        self._lateness: Histogram | None = None
        self._closed = False

    def use(self, histogram: Histogram) -> None:
        self._lateness = histogram

    # -- the scheduler's thread -----------------------------------------------------

    def before_send(self, entry: Any) -> float | None:
        """Called before ``Scheduler.apply_async`` sends ``entry``: its lateness."""
        try:
            return lateness(entry)
        except Exception as exc:  # noqa: BLE001 - a schedule we cannot read: no figure
            report("beat lateness", exc)
            return None

    def after_send(self, entry: Any, late: float | None, sent: bool) -> None:
        """After the send (``sent``: it raised nothing); the entry's next due time."""
        if self._closed:
            return
        try:
            now = time.time()
            attributes = _entry_attributes(entry)
            name = attributes[attrs.CELERY_BEAT_ENTRY]
            upcoming = next_run_in(entry)
            with self._lock:
                if name not in self._next and len(self._next) >= MAX_ENTRIES:
                    return
                if upcoming is not None:
                    self._next[name] = (now + upcoming, attributes)
                if sent:
                    self._last[name] = (now, attributes)
            if sent and late is not None and self._lateness is not None:
                self._lateness.record(late, attributes)
        except Exception as exc:  # noqa: BLE001
            report("beat send", exc)

    def wrap_populate_heap(
        self, wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any
    ) -> Any:
        result = wrapped(*args, **kwargs)
        self.heap_built(getattr(instance, "_heap", None) or ())
        return result

    def heap_built(self, heap: Iterable[Any]) -> None:
        """After ``Scheduler.populate_heap``: every entry's next due time (heap events
        are ``(utc timestamp, priority, entry)``); entries no longer there are dropped."""
        if self._closed:
            return
        try:
            fresh: dict[str, tuple[float, dict[str, str]]] = {}
            for event in heap:
                entry = event[2]
                attributes = _entry_attributes(entry)
                fresh[attributes[attrs.CELERY_BEAT_ENTRY]] = (float(event[0]), attributes)
                if len(fresh) >= MAX_ENTRIES:
                    break
            with self._lock:
                self._next = fresh
                self._last = {k: v for k, v in self._last.items() if k in fresh}
        except Exception as exc:  # noqa: BLE001
            report("beat schedule", exc)

    def close(self) -> None:
        self._closed = True
        with self._lock:
            self._next = {}
            self._last = {}

    # -- the SDK's collection thread ------------------------------------------------

    def next_run_times(self) -> list[Observation]:
        with self._lock:
            values = list(self._next.values())
        return [Observation(value, attributes) for value, attributes in values]

    def last_send_times(self) -> list[Observation]:
        with self._lock:
            values = list(self._last.values())
        return [Observation(value, attributes) for value, attributes in values]


# The SDK cannot remove an instrument: its callbacks read the current BeatMonitor (_current.py).
_holder: Current[BeatMonitor] = Current("beat metrics")
activate = _holder.activate
_callback = _holder.callback


def create_instruments(meter: Meter, monitor: BeatMonitor) -> None:
    monitor.use(
        histogram(meter, LATENESS, "How long after its due time beat sent an entry.",
                  _LATENESS_BUCKETS)
    )
    meter.create_observable_gauge(
        NEXT_RUN_TIME, callbacks=[_callback(BeatMonitor.next_run_times)], unit="s",
        description="When a beat schedule entry is due next (seconds since the epoch).",
    )
    meter.create_observable_gauge(
        LAST_SEND_TIME, callbacks=[_callback(BeatMonitor.last_send_times)], unit="s",
        description="When beat last sent a schedule entry (seconds since the epoch).",
    )
