import logging

from celery import Celery, signals
from opentelemetry._logs import set_logger_provider
from opentelemetry.instrumentation.logging import LoggingInstrumentor
from opentelemetry.sdk._logs import LoggerProvider

try:  # the logs bridge's handler, in opentelemetry-instrumentation-logging since 0.5x
    from opentelemetry.instrumentation.logging.handler import LoggingHandler
except ImportError:  # older releases: the SDK's
    from opentelemetry.sdk._logs import LoggingHandler

from otel_celery_headers import CeleryHeadersInstrumentor

app = Celery("proj")
app.conf.worker_log_format = (
    "[%(asctime)s: %(levelname)s/%(processName)s] "
    "trace_id=%(otelTraceID)s span_id=%(otelSpanID)s %(message)s"
)
app.conf.worker_task_log_format = app.conf.worker_log_format

provider = LoggerProvider()          # add your exporter's processor here
set_logger_provider(provider)
LoggingInstrumentor().instrument(inject_trace_context=True)  # or OTEL_PYTHON_LOG_CORRELATION=true
CeleryHeadersInstrumentor().instrument()

bridge = LoggingHandler(logger_provider=provider)


@signals.after_setup_logger.connect
def _bridge(logger, **_):
    # worker_hijack_root_logger (Celery's default) removes the root logger's handlers,
    # the bridge included: add it back once Celery has set up logging.
    logger.addHandler(bridge)


@signals.after_setup_task_logger.connect
def _bridge_tasks(logger, **_):
    logger.addHandler(bridge)  # Celery's task logger does not propagate to the root
