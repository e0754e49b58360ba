opentelemetry-instrument celery -A fastapi_app:celery_app worker --pool prefork
opentelemetry-instrument uvicorn fastapi_app:api
