"""celery beat as a dead-man's switch: lateness, next run and last send per entry, from a
real `celery beat` with each scheduler we support, on a schedule the test controls."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import yaml

from tests.support.file_exporter import read_spans
from tests.support.metric_file import latest, read_points, total
from tests.support.prefork import prefork_worker
from tests.support.prometheus import prometheus_server
from tests.support.servers import free_port

ROOT = Path(__file__).resolve().parents[1]
TZ = "Asia/Kolkata"  # UTC+05:30: a half-hour offset shows any UTC/local mix-up
SENDS = 4  # every-2s sends to wait for: the late first one, then on time


def daily_at() -> tuple[int, int]:
    """A time of day 75 minutes from now in TZ: the crontab entry cannot come due during
    the test by itself, and django-celery-beat (which loads only crontabs within two
    hours of now) still loads it."""
    soon = datetime.now(ZoneInfo(TZ)) + timedelta(minutes=75)
    return soon.hour, soon.minute


def next_fire_after(moment: float, at: tuple[int, int]) -> float:
    """The first HH:MM in TZ strictly after ``moment``: crontab(minute=MM, hour=HH)."""
    local = datetime.fromtimestamp(moment, ZoneInfo(TZ))
    candidate = local.replace(hour=at[0], minute=at[1], second=0, microsecond=0)
    if candidate <= local:
        candidate += timedelta(days=1)
    return candidate.timestamp()


def start_beat(redis_url: str, tmp_path: Path, scheduler: str, last_run: dict[str, float],
               at: tuple[int, int], queue: str, **extra_env: str):
    """A `celery beat` subprocess; its span and metric files, its process, its log path."""
    span_file, metric_file = tmp_path / "spans.jsonl", tmp_path / "metrics.jsonl"
    env = dict(
        os.environ, BROKER_URL=redis_url, QUEUE=queue, SPAN_FILE=str(span_file),
        METRIC_FILE=str(metric_file), METRIC_INTERVAL_MS="300", BEAT_TZ=TZ,
        SCHEDULER=scheduler, LAST_RUN=json.dumps(last_run), DAILY_AT=f"{at[0]:02d}:{at[1]:02d}",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        **extra_env,
    )
    args = [sys.executable, "-m", "celery", "-A", "tests.support.beat_app", "beat",
            "--loglevel", "INFO", "--max-interval", "1", "-s", str(tmp_path / "schedule")]
    if scheduler == "django":
        env.update(DJANGO_SETTINGS_MODULE="tests.support.beat_django", BEAT_DB=str(tmp_path / "beat.sqlite3"))
        subprocess.run([sys.executable, "-m", "tests.support.beat_django", queue], cwd=ROOT, env=env,
                       check=True, timeout=120)
        args += ["-S", "django_celery_beat.schedulers:DatabaseScheduler"]
    elif scheduler == "redbeat":
        args += ["-S", "redbeat.RedBeatScheduler"]
    with open(tmp_path / "beat.log", "wb") as log:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return span_file, metric_file, proc, tmp_path / "beat.log"


def stop_beat(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)  # beat exits; the SDK's atexit exports the last points
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def run_beat(redis_url: str, tmp_path: Path, scheduler: str, last_run: dict[str, float],
             at: tuple[int, int], queue: str):
    """Beat until every-2s was sent SENDS times; its spans, metric points and log."""
    span_file, metric_file, proc, log_path = start_beat(
        redis_url, tmp_path, scheduler, last_run, at, queue)
    try:
        deadline = time.monotonic() + 60
        while len(sends(span_file, "every-2s")) < SENDS:
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
    finally:
        stop_beat(proc)
    return read_spans(span_file), read_points(metric_file), log_path.read_text()


def sends(span_file: Path, entry: str) -> list[dict]:
    return [s for s in read_spans(span_file)
            if s["kind"] == "PRODUCER" and s["attributes"].get("celery.beat.entry") == entry]


def stream(points: list[dict], name: str, entry: str) -> dict:
    found = [p for p in latest(points).values()
             if p["name"] == name and p["attributes"].get("celery.beat.entry") == entry]
    assert len(found) == 1, found
    assert found[0]["attributes"] == {"celery.beat.entry": entry, "celery.task.name": "beat.tick"}
    return found[0]


@pytest.mark.parametrize("scheduler", ["default", "redbeat", "django"])
def test_lateness_next_run_and_last_send_per_entry(redis_url, tmp_path, scheduler):
    """An interval entry last run 62 s ago and a daily crontab last run two days ago (timezone Asia/Kolkata):
    each first send's lateness is its send time minus its due time, the on-time sends are under 1 s late,
    next run is 2 s after the last send and the crontab's next time of day, last send is the last send's time."""
    now, at = time.time(), daily_at()
    last_run = {"every-2s": now - 62, "daily": now - 2 * 86400}
    with prefork_worker(redis_url, tmp_path, metrics=True) as worker:
        spans, points, log = run_beat(redis_url, tmp_path, scheduler, last_run, at, worker.queue)
        sent = len(sends_of(spans, "every-2s")) + 1
        processed = worker.wait_spans(lambda found: len(consumers(found)) == sent and consumers(found))
        worker.stop()  # its last export counts every delivery
        worker_points = worker.metric_points()
    check_worker(spans, processed, worker_points)

    every = sorted(sends_of(spans, "every-2s"), key=lambda s: s["start_ns"])
    daily = sends_of(spans, "daily")
    assert len(daily) == 1, log
    send_times = [s["start_ns"] / 1e9 for s in every]

    late = stream(points, "celery.beat.lateness", "every-2s")
    assert late["count"] == len(every)
    first_late = send_times[0] - (last_run["every-2s"] + 2)
    bounds, buckets = late["bounds"], late["buckets"]
    # Ours start 0.1, 0.5, 1; an SDK that ignores the advice (1.28) has 0, 5, 10, ...
    limit = min(b for b in bounds if b >= 1)
    on_time = sum(c for b, c in zip(bounds + [float("inf")], buckets) if b <= limit)
    assert on_time == len(every) - 1, (bounds, buckets)
    assert late["sum"] == pytest.approx(first_late, abs=(len(every) - 1) * limit + 0.2)

    sent = daily[0]["start_ns"] / 1e9
    daily_late = stream(points, "celery.beat.lateness", "daily")
    assert daily_late["count"] == 1
    assert daily_late["sum"] == pytest.approx(sent - next_fire_after(last_run["daily"], at), abs=0.2)
    assert daily_late["sum"] > 86400  # two days ago's run came due a day and more ago

    last_send = stream(points, "celery.beat.last_send_time", "every-2s")["value"]
    assert last_send == pytest.approx(send_times[-1], abs=0.2)
    assert stream(points, "celery.beat.next_run_time", "every-2s")["value"] == pytest.approx(last_send + 2, abs=0.2)
    assert stream(points, "celery.beat.last_send_time", "daily")["value"] == pytest.approx(sent, abs=0.2)
    assert stream(points, "celery.beat.next_run_time", "daily")["value"] == pytest.approx(
        next_fire_after(sent, at), abs=1.0)


def consumers(spans: list[dict]) -> list[dict]:
    return [s for s in spans if s["kind"] == "CONSUMER"]


def check_worker(sends: list[dict], processed: list[dict], points: list[dict]) -> None:
    """Each process span names the entry its publish did, in the publish's trace; the
    worker's delivery metrics count each entry's runs under its name."""
    by_id = {s["attributes"]["messaging.message.id"]: s for s in sends if s["kind"] == "PRODUCER"}
    for span in processed:
        send = by_id[span["attributes"]["messaging.message.id"]]
        assert span["trace_id"] == send["trace_id"] and span["parent_id"] == send["span_id"]
        assert span["attributes"]["celery.beat.entry"] == send["attributes"]["celery.beat.entry"]
    for entry in ("every-2s", "daily"):
        runs = len(sends_of(sends, entry))
        for name in ("messaging.client.consumed.messages", "messaging.process.duration",
                     "celery.message.queue_time"):
            assert total(points, name, **{"celery.beat.entry": entry, "celery.task.state": "SUCCESS"}
                         if name != "celery.message.queue_time" else {"celery.beat.entry": entry}) == runs, name
    assert total(points, "messaging.client.consumed.messages") == len(processed)


def sends_of(spans: list[dict], entry: str) -> list[dict]:
    return [s for s in spans if s["kind"] == "PRODUCER" and s["attributes"].get("celery.beat.entry") == entry]


def beat_alerts() -> dict[str, str]:
    rules = yaml.safe_load((ROOT / "monitoring/prometheus/alerts.yaml").read_text())
    group = next(g for g in rules["groups"] if g["name"] == "celery-beat")
    return {rule["alert"]: rule["expr"] for rule in group["rules"]}


def test_beat_alerts_on_a_real_prometheus(redis_url, tmp_path):
    """The shipped beat alerts' expressions, asked of a real Prometheus scraping a real beat: an entry sent 150 s late
    is late, nothing is missed while beat runs, and once beat stops the job is gone."""
    expressions = beat_alerts()
    port = free_port()
    queue = f"beat-{uuid.uuid4().hex[:8]}"
    with prometheus_server([f"127.0.0.1:{port}"]) as prometheus:
        _, _, proc, log_path = start_beat(
            redis_url, tmp_path, "default", {"every-2s": time.time() - 152}, daily_at(), queue,
            PROM_PORT=str(port))
        try:
            prometheus.wait("count by (celery_beat_entry) (celery_beat_next_run_time_seconds)",
                            "celery_beat_entry", {"every-2s": 1.0, "daily": 1.0}, timeout=60)
            late = expressions["CeleryBeatEntryLate"]
            prometheus.wait(late, "celery_beat_entry", {"every-2s": 1.0}, timeout=30)
            # The on-time sends that follow stay below the 60 s bucket: still one late send.
            prometheus.wait("sum by (celery_beat_entry) (celery_beat_lateness_seconds_count"
                            "{celery_beat_entry='every-2s'}) >= bool 3", "celery_beat_entry",
                            {"every-2s": 1.0}, timeout=30)
            assert prometheus.values(late, "celery_beat_entry") == {"every-2s": 1.0}
            assert prometheus.values(expressions["CeleryBeatEntryMissed"], "celery_beat_entry") == {}
            assert prometheus.values(expressions["CeleryBeatGone"], "job") == {}
        finally:
            stop_beat(proc)
        assert "Sending due task every-2s" in log_path.read_text()
        gone = f"count by (job) ({expressions['CeleryBeatGone']})"
        prometheus.wait(gone, "job", {"celery": 1.0}, timeout=30)
