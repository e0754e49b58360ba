from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from otel_celery_headers import CeleryHeadersInstrumentor

resource = Resource.create({"service.name": "shop-worker"})
tracer_provider = TracerProvider(resource=resource)
tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
meter_provider = MeterProvider(
    resource=resource, metric_readers=[PeriodicExportingMetricReader(OTLPMetricExporter())]
)

# One call, every option in it: a second instrument() call is ignored
# ("already instrumented"), its options too.
CeleryHeadersInstrumentor().instrument(
    tracer_provider=tracer_provider,
    meter_provider=meter_provider,
    exclude_tasks=["celery.*"],
)
