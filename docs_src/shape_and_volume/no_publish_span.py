from otel_celery_headers import CeleryHeadersInstrumentor

CeleryHeadersInstrumentor().instrument(no_publish_span=["thumbnails.*"])
