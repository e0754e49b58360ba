export DJANGO_SETTINGS_MODULE=proj.settings
OTEL_SERVICE_NAME=shop-worker opentelemetry-instrument celery -A proj worker --pool prefork
OTEL_SERVICE_NAME=shop-web opentelemetry-instrument python manage.py runserver --noreload
