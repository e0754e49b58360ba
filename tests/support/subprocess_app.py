"""What the worker-subprocess app modules (worker_app, green_app) share: their tracer
provider writing JSON lines, and their Celery app, both from the environment the
launcher in prefork.py sets (BROKER_URL, SPAN_FILE, QUEUE)."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

from tests.support.file_exporter import JsonLinesExporter


def global_provider(service: str, schedule_delay_millis: int,
                    exporter: SpanExporter | None = None) -> TracerProvider:
    """The process's global TracerProvider, batching to ``exporter`` (SPAN_FILE if None)."""
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(
        exporter or JsonLinesExporter(os.environ["SPAN_FILE"]),
        schedule_delay_millis=schedule_delay_millis,
        max_export_batch_size=512,
    ))
    trace.set_tracer_provider(provider)
    return provider


def global_meter_provider(service: str) -> Any:
    """If METRIC_FILE is set: the process's global MeterProvider, exporting there every
    METRIC_INTERVAL_MS (500 ms unless told) as JSON lines (tests/support/metric_file.py)."""
    path = os.environ.get("METRIC_FILE")
    if not path:
        return None
    from opentelemetry import metrics
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    from tests.support.metric_file import JsonLinesMetricExporter

    reader = PeriodicExportingMetricReader(
        JsonLinesMetricExporter(path),
        export_interval_millis=int(os.environ.get("METRIC_INTERVAL_MS", "500")),
    )
    provider = MeterProvider(
        metric_readers=[reader], resource=Resource.create({"service.name": service})
    )
    metrics.set_meter_provider(provider)
    return provider


def subprocess_app(name: str, **conf: Any) -> Celery:
    """A Celery app on BROKER_URL (also its result backend unless BACKEND_URL), consuming QUEUE;
    VISIBILITY_TIMEOUT (seconds) goes to broker_transport_options (kombu's Redis transport)."""
    backend = os.environ.get("BACKEND_URL") or os.environ["BROKER_URL"]
    app = Celery(name, broker=os.environ["BROKER_URL"], backend=backend)
    if os.environ.get("VISIBILITY_TIMEOUT"):
        app.conf.broker_transport_options = {"visibility_timeout": float(os.environ["VISIBILITY_TIMEOUT"])}
    app.conf.update(
        task_default_queue=os.environ.get("QUEUE", "celery"),
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        **conf,
    )
    return app
