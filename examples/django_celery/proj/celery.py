"""The Celery app, configured from Django's settings (``CELERY_*`` names)."""

import os

from celery import Celery

# Too late under opentelemetry-instrument (see manage.py): export it instead.
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj.settings")

app = Celery("proj")
# CELERY_BROKER_URL in settings.py becomes broker_url, and so on.
app.config_from_object("django.conf:settings", namespace="CELERY")
# Imports orders/tasks.py (the tasks.py of every app in INSTALLED_APPS).
app.autodiscover_tasks()
