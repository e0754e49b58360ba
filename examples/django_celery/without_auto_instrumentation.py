# Not imported by the example. Without opentelemetry-instrument, this goes at the end
# of proj/celery.py: the SDK, then our instrumentor, once per process. Both processes
# import that file: the web process through proj/__init__.py when Django starts, the
# worker's main process through `celery -A proj`, before the pool forks.
# (tests/test_django_example.py appends this file to a copy of proj/celery.py and runs
# the project with plain `celery worker` and `runserver`.)
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from otel_celery_headers import CeleryHeadersInstrumentor

provider = TracerProvider()  # service.name from OTEL_SERVICE_NAME
provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))  # OTEL_EXPORTER_OTLP_*
trace.set_tracer_provider(provider)
CeleryHeadersInstrumentor().instrument()
