"""App module for `celery -A tests.support.quiet_app worker`: worker_app's tasks and
tracing, with opentelemetry-instrumentation-redis active (what `opentelemetry-bootstrap
-a install` sets up beside us) so every Redis command the worker sends could be a span."""

from __future__ import annotations

from opentelemetry.instrumentation.redis import RedisInstrumentor

from tests.support.worker_app import app, tasks  # noqa: F401 - the worker's app and tasks

RedisInstrumentor().instrument()
