opentelemetry-instrument celery -A flask_app:celery_app worker --pool prefork
opentelemetry-instrument flask --app flask_app run
