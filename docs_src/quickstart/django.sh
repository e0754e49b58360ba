export DJANGO_SETTINGS_MODULE=proj.settings
opentelemetry-instrument celery -A proj worker --pool prefork
opentelemetry-instrument python manage.py runserver --noreload
