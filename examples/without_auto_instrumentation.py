# Not imported by the examples. Without opentelemetry-instrument, this goes at the end
# of the module that both the web process and the worker import once at startup:
# proj/celery.py in examples/django_celery (imported through proj/__init__.py when
# Django starts, and by `celery -A proj`), shop/__init__.py in examples/flask_celery
# (imported by the web server and by make_celery.py). The worker imports it in its
# main process, before the pool forks. tests/test_django_example.py and
# tests/test_flask_example.py append it to a copy of those files and run the
# projects with plain `celery worker` and `runserver` / `flask run`.
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from otel_celery_headers import CeleryHeadersInstrumentor

provider = TracerProvider()  # service.name from OTEL_SERVICE_NAME
provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))  # OTEL_EXPORTER_OTLP_*
trace.set_tracer_provider(provider)
CeleryHeadersInstrumentor().instrument()
