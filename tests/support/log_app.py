"""App module for `celery -A tests.support.log_app worker`: worker_app's tasks and
tracing, with log correlation the way a user sets it up.

opentelemetry-instrumentation-logging with OTEL_PYTHON_LOG_CORRELATION=true (set by the
test) puts otelTraceID, otelSpanID, otelTraceSampled and otelServiceName on every
record; Celery's worker_log_format / worker_task_log_format print them. Celery's
worker_hijack_root_logger (its default, kept here) clears the root logger's handlers,
so the logs bridge's LoggingHandler is added once Celery has set up logging
(after_setup_logger, after_setup_task_logger), over a LoggerProvider writing every
record synchronously to LOG_RECORD_FILE as JSON lines.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import signals
from opentelemetry._logs import set_logger_provider
from opentelemetry.instrumentation.logging import LoggingInstrumentor
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
from opentelemetry.sdk.resources import Resource

from tests.support.log_file import JsonLinesLogExporter

try:
    from opentelemetry.instrumentation.logging.handler import LoggingHandler
except ImportError:  # instrumentation-logging 0.49b0 (celery53) has none: the SDK's, same class
    from opentelemetry.sdk._logs import LoggingHandler
from tests.support.worker_app import app, tasks  # noqa: F401 - the worker's app and tasks

LINE_FORMAT = (
    "[%(processName)s] trace=%(otelTraceID)s span=%(otelSpanID)s "
    "sampled=%(otelTraceSampled)s service=%(otelServiceName)s | %(message)s"
)
TASK_LINE_FORMAT = LINE_FORMAT  # the task logger's lines, in the same shape


app.conf.update(
    worker_hijack_root_logger=True,
    worker_log_format=LINE_FORMAT,
    worker_task_log_format=TASK_LINE_FORMAT,
)
provider = LoggerProvider(resource=Resource.create({"service.name": "worker"}))
provider.add_log_record_processor(SimpleLogRecordProcessor(JsonLinesLogExporter(os.environ["LOG_RECORD_FILE"])))
set_logger_provider(provider)
LoggingInstrumentor().instrument(enable_log_auto_instrumentation=False)
bridge = LoggingHandler(level=logging.INFO, logger_provider=provider)


@signals.after_setup_logger.connect(weak=False)
def _bridge_root(logger: logging.Logger, **_: Any) -> None:
    logger.addHandler(bridge)


@signals.after_setup_task_logger.connect(weak=False)
def _bridge_task_logger(logger: logging.Logger, **_: Any) -> None:
    logger.addHandler(bridge)  # celery.task does not propagate to the root logger
