"""Django settings for a `celery beat -S django_celery_beat.schedulers:DatabaseScheduler`
under test, and ``python -m tests.support.beat_django <queue>``, which migrates the
database (BEAT_DB) and stores the two entries tests/support/beat_app.py defines for the
other schedulers, with the last runs LAST_RUN gives (JSON: name -> epoch seconds)."""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime, timezone

SECRET_KEY = "tests-only"
USE_TZ = True
TIME_ZONE = os.environ.get("BEAT_TZ", "UTC")
INSTALLED_APPS = ["django_celery_beat"]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": os.environ.get("BEAT_DB", ":memory:")}}
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"


def main(queue: str) -> None:
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)
    from django_celery_beat.models import CrontabSchedule, IntervalSchedule, PeriodicTask

    last = {k: datetime.fromtimestamp(v, tz=timezone.utc) for k, v in json.loads(os.environ.get("LAST_RUN") or "{}").items()}
    every = IntervalSchedule.objects.create(every=2, period=IntervalSchedule.SECONDS)
    hour, minute = os.environ.get("DAILY_AT", "03:00").split(":")
    daily = CrontabSchedule.objects.create(minute=str(int(minute)), hour=str(int(hour)), timezone=TIME_ZONE)
    PeriodicTask.objects.create(name="every-2s", task="beat.tick", interval=every, args='["every-2s"]',
                                queue=queue, last_run_at=last.get("every-2s"))
    PeriodicTask.objects.create(name="daily", task="beat.tick", crontab=daily, args='["daily"]',
                                queue=queue, last_run_at=last.get("daily"))


if __name__ == "__main__":
    main(sys.argv[1])
