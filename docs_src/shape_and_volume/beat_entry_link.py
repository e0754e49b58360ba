import os

from celery import Celery
from celery.schedules import crontab

from otel_celery_headers import TRACE_SHAPE_HEADER

app = Celery("reports", broker=os.environ.get("CELERY_BROKER_URL", "redis://localhost:6379/0"))


@app.task(name="reports.nightly")
def nightly() -> None:
    ...  # build the report


app.conf.beat_schedule = {
    "nightly-report": {
        "task": "reports.nightly",
        "schedule": crontab(minute=0, hour=3),
        "options": {"headers": {TRACE_SHAPE_HEADER: "link"}},
    },
}
