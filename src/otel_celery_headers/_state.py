"""Per-context state shared by the publish and execution sides."""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

# The publish being traced in this context (a producer._Publish), so the send_task()
# nested in an apply_async() is not traced twice. An eager task runs inline inside
# apply_async(): consumer.py clears this for the task's execution, so what the task
# publishes is traced on its own.
current_publish: ContextVar[Any] = ContextVar("otel_celery_publish", default=None)
