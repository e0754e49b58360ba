"""beat.py alone: lateness against a schedule, the entry cap, entries removed from the schedule."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

from celery import Celery
from celery.schedules import schedule

from otel_celery_headers import beat

APP = Celery("beat-monitor", set_as_current=False)
NOW = datetime(2026, 12, 4, 12, 0, 0, tzinfo=timezone.utc)


def entry(name: str, every: float, last_run_at: datetime | None) -> SimpleNamespace:
    sched = schedule(timedelta(seconds=every), nowfun=lambda: NOW, app=APP)
    return SimpleNamespace(name=name, task="t.add", schedule=sched, last_run_at=last_run_at)


class Histogram:
    def __init__(self) -> None:
        self.recorded: list[tuple[float, dict]] = []

    def record(self, value: float, attributes: dict) -> None:
        self.recorded.append((value, dict(attributes)))


def test_lateness_is_the_time_since_due():
    """An entry every 30 s last run 100 s ago is 70 s late; one run 10 s ago, or a send 10 ms early, is 0; never run is 0."""
    assert beat.lateness(entry("a", 30, NOW - timedelta(seconds=100))) == 70.0
    assert beat.lateness(entry("a", 30, NOW - timedelta(seconds=10))) == 0.0
    assert beat.lateness(entry("a", 30, NOW - timedelta(seconds=29.99))) == 0.0
    assert beat.lateness(entry("a", 30, None)) == 0.0


def test_a_send_records_lateness_last_send_and_next_run(monkeypatch):
    """One send: one lateness point and the two gauges, each with the entry and task name only."""
    monkeypatch.setattr(beat.time, "time", lambda: NOW.timestamp())
    monitor, histogram = beat.BeatMonitor(), Histogram()
    monitor.use(histogram)  # type: ignore[arg-type]
    sent = entry("report", 30, NOW - timedelta(seconds=100))
    monitor.after_send(sent, monitor.before_send(sent), sent=True)
    labels = {"celery.beat.entry": "report", "celery.task.name": "t.add"}
    assert histogram.recorded == [(70.0, labels)]
    assert [(o.value, o.attributes) for o in monitor.last_send_times()] == [(NOW.timestamp(), labels)]
    assert [(o.value, o.attributes) for o in monitor.next_run_times()] == [(NOW.timestamp() + 30, labels)]


def test_a_failed_send_updates_only_the_next_run(monkeypatch):
    """A send that raised records no lateness and no last send; the next run still moves on."""
    monkeypatch.setattr(beat.time, "time", lambda: NOW.timestamp())
    monitor, histogram = beat.BeatMonitor(), Histogram()
    monitor.use(histogram)  # type: ignore[arg-type]
    sent = entry("report", 30, NOW - timedelta(seconds=100))
    monitor.after_send(sent, monitor.before_send(sent), sent=False)
    assert histogram.recorded == [] and monitor.last_send_times() == []
    assert [o.value for o in monitor.next_run_times()] == [NOW.timestamp() + 30]


def test_entries_gone_from_the_schedule_are_forgotten():
    """A rebuilt heap (django-celery-beat after an edit) replaces the next runs; an entry no longer there loses both gauges."""
    monitor = beat.BeatMonitor()
    old, kept = entry("old", 30, NOW), entry("kept", 30, NOW)
    monitor.after_send(old, 0.0, sent=True)
    monitor.after_send(kept, 0.0, sent=True)
    monitor.heap_built([(1000.0, 5, kept)])
    assert [(o.value, o.attributes["celery.beat.entry"]) for o in monitor.next_run_times()] == [(1000.0, "kept")]
    assert [o.attributes["celery.beat.entry"] for o in monitor.last_send_times()] == ["kept"]


def test_at_most_max_entries_are_tracked():
    """Past MAX_ENTRIES names, a new entry gets no series; the known ones keep theirs."""
    monitor = beat.BeatMonitor()
    for i in range(beat.MAX_ENTRIES + 5):
        monitor.after_send(entry(f"e{i}", 30, NOW), 0.0, sent=True)
    assert len(monitor.next_run_times()) == beat.MAX_ENTRIES
    assert len(monitor.last_send_times()) == beat.MAX_ENTRIES
    monitor.heap_built([(float(i), 5, entry(f"h{i}", 30, NOW)) for i in range(beat.MAX_ENTRIES + 5)])
    assert len(monitor.next_run_times()) == beat.MAX_ENTRIES


def test_entry_header_is_bounded_and_typed():
    """The worker takes the entry name from a string header only, cut to 200 characters."""
    assert beat.entry_of(SimpleNamespace(otel_celery_beat_entry="nightly")) == "nightly"
    assert beat.entry_of(SimpleNamespace(otel_celery_beat_entry="x" * 500)) == "x" * 200
    assert beat.entry_of(SimpleNamespace(otel_celery_beat_entry=7)) is None
    assert beat.entry_of(SimpleNamespace()) is None
