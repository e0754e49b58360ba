"""App module for `celery -A tests.support.worker_app worker` subprocesses.

Environment: BROKER_URL, SPAN_FILE (JSON lines), INSTRUMENT_AT ("import", the way
auto-instrumentation does it, before the fork; or "process_init", in each child),
OTLP_TRACES_URL (send spans over OTLP/HTTP there instead of to SPAN_FILE).
Spans go through a BatchSpanProcessor with a one-minute delay: a span reaches the
file only if the instrumentation flushes it before a pool child exits.
"""

from __future__ import annotations

import os

from celery import Celery, signals
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from otel_celery_headers import CeleryHeadersInstrumentor
from tests.support.file_exporter import JsonLinesExporter
from tests.support.tasks import register

provider = TracerProvider(resource=Resource.create({"service.name": "worker"}))
if os.environ.get("OTLP_TRACES_URL"):
    # The soak: spans over OTLP/HTTP to a receiver, with the SDK's default batching.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=os.environ["OTLP_TRACES_URL"]))
    )
else:
    provider.add_span_processor(
        BatchSpanProcessor(
            JsonLinesExporter(os.environ["SPAN_FILE"]),
            schedule_delay_millis=60_000,
            max_export_batch_size=512,
        )
    )
trace.set_tracer_provider(provider)

app = Celery("worker_app", broker=os.environ["BROKER_URL"], backend=os.environ["BROKER_URL"])
app.conf.update(
    task_default_queue=os.environ.get("QUEUE", "celery"),
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    task_protocol=int(os.environ.get("TASK_PROTOCOL", "2")),
)
tasks = register(app)

if os.environ.get("INSTRUMENT_AT", "import") == "import":
    CeleryHeadersInstrumentor().instrument()
else:

    @signals.worker_process_init.connect(weak=False)
    def _instrument_in_child(**_: object) -> None:
        CeleryHeadersInstrumentor().instrument()
