"""The smallest settings the quick start's project runs with (not shown in the README)."""

import os

SECRET_KEY = "docs-sample-only"
DEBUG = False
ALLOWED_HOSTS = ["localhost", "127.0.0.1", "testserver"]
INSTALLED_APPS = ["shop"]
ROOT_URLCONF = "proj.urls"
DATABASES: dict[str, dict[str, str]] = {}
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "redis://localhost:6379/0")
