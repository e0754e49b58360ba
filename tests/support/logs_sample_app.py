"""App module for `celery -A tests.support.logs_sample_app worker`: docs_src/logs/celery_app.py
as written, its app given the tasks of tests/support/tasks.py.

What the sample leaves to the user is filled in from the environment prefork.py sets:
the tracer provider (spans to SPAN_FILE, every SPAN_DELAY_MS), and the exporter's
processor on the sample's LoggerProvider (records to LOG_RECORD_FILE as JSON lines).
The sample's Celery app finds its broker in CELERY_BROKER_URL, as Celery reads it.
"""

from __future__ import annotations

import os
import runpy
from pathlib import Path

from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor

from tests.support.log_file import JsonLinesLogExporter
from tests.support.subprocess_app import global_provider
from tests.support.tasks import register

SAMPLE = Path(__file__).resolve().parents[2] / "docs_src" / "logs" / "celery_app.py"

global_provider("worker", schedule_delay_millis=int(os.environ.get("SPAN_DELAY_MS", "100")))
# The sample's module globals: kept alive here, so are its (weakly connected) receivers.
sample = runpy.run_path(str(SAMPLE))
app = sample["app"]
app.conf.task_default_queue = os.environ["QUEUE"]
tasks = register(app)
sample["provider"].add_log_record_processor(
    SimpleLogRecordProcessor(JsonLinesLogExporter(os.environ["LOG_RECORD_FILE"]))
)
