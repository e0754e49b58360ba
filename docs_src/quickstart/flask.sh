OTEL_SERVICE_NAME=shop-worker opentelemetry-instrument celery -A flask_app:celery_app worker --pool prefork
OTEL_SERVICE_NAME=shop-web opentelemetry-instrument flask --app flask_app run
