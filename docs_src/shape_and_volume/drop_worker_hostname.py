from otel_celery_headers import CeleryHeadersInstrumentor

CeleryHeadersInstrumentor().instrument(metrics_worker_hostname="drop")
