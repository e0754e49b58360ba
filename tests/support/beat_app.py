"""App module for `celery -A tests.support.beat_app beat` subprocesses (tests/test_beat.py).

Environment: BROKER_URL, QUEUE (where the entries' tasks go), SPAN_FILE, METRIC_FILE
(every METRIC_INTERVAL_MS; or PROM_PORT, for Prometheus to scrape), BEAT_TZ (the app's timezone), DAILY_AT (HH:MM), SCHEDULER (``default``,
``redbeat`` or ``django``; the last reads its entries from the database that
DJANGO_SETTINGS_MODULE names, the others from ``beat_schedule`` below), and LAST_RUN
(JSON: entry name -> seconds since the epoch): the schedule the test controls, set on
the scheduler's own entries when beat starts, before its first tick, through each
scheduler's public way of storing a run (an entry's ``last_run_at``; redbeat's
``reschedule``).
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from typing import Any

from celery import signals
from celery.schedules import crontab

from otel_celery_headers import CeleryHeadersInstrumentor
from tests.support.subprocess_app import global_meter_provider, global_provider, subprocess_app

SCHEDULER = os.environ.get("SCHEDULER", "default")
if SCHEDULER == "django":
    import django

    django.setup()

global_provider("beat", schedule_delay_millis=200)
if os.environ.get("PROM_PORT"):
    # The OpenTelemetry Prometheus exporter route (tests/test_monitoring.py's): a
    # prometheus_client server Prometheus scrapes.
    from opentelemetry import metrics
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import start_http_server

    start_http_server(port=int(os.environ["PROM_PORT"]), addr="127.0.0.1")
    metrics.set_meter_provider(MeterProvider(metric_readers=[PrometheusMetricReader()]))
else:
    global_meter_provider("beat")
app = subprocess_app("beat_app", timezone=os.environ.get("BEAT_TZ", "UTC"))
QUEUE = os.environ.get("QUEUE", "celery")
HOUR, MINUTE = (int(part) for part in os.environ.get("DAILY_AT", "03:00").split(":"))
if SCHEDULER != "django":
    app.conf.beat_schedule = {
        "every-2s": {"task": "beat.tick", "schedule": 2.0, "args": ("every-2s",),
                     "options": {"queue": QUEUE}},
        # Once a day at DAILY_AT (HH:MM in the app's timezone; the test picks a time
        # over an hour away): not due during a test unless LAST_RUN says so.
        "daily": {"task": "beat.tick", "schedule": crontab(minute=MINUTE, hour=HOUR),
                  "args": ("daily",), "options": {"queue": QUEUE}},
    }
if SCHEDULER == "redbeat":
    app.conf.redbeat_redis_url = os.environ["BROKER_URL"]
    app.conf.redbeat_key_prefix = f"redbeat-{QUEUE}:"
    app.conf.redbeat_lock_key = None  # one beat per test: no lock to wait for


@app.task(name="beat.tick")
def tick(name: str) -> str:
    return name


CeleryHeadersInstrumentor().instrument()


@signals.beat_init.connect(weak=False)
def _set_last_runs(sender: Any = None, **_: Any) -> None:
    wanted = json.loads(os.environ.get("LAST_RUN") or "{}")
    if not wanted:
        return
    scheduler = sender.scheduler
    for name, seconds in wanted.items():
        when = datetime.fromtimestamp(seconds, tz=timezone.utc)
        if SCHEDULER == "redbeat":
            from redbeat.schedulers import RedBeatSchedulerEntry

            key = RedBeatSchedulerEntry.generate_key(app, name)
            RedBeatSchedulerEntry.from_key(key, app=app).reschedule(last_run_at=when)
        elif SCHEDULER == "default":
            scheduler.schedule[name].last_run_at = when
    if SCHEDULER == "default":
        scheduler.sync()
