OTEL_SERVICE_NAME=shop-worker opentelemetry-instrument celery -A fastapi_app:celery_app worker --pool prefork
OTEL_SERVICE_NAME=shop-web opentelemetry-instrument uvicorn fastapi_app:api
