"""What our instrumentor has wrapped and connected right now (for mirror and no-op checks)."""

from __future__ import annotations

import wrapt
from celery import signals
from celery.app.base import Celery
from celery.app.task import Task
from celery.beat import Scheduler
from celery.worker import strategy
from celery.worker.request import Request
from opentelemetry.instrumentation.celery import CeleryInstrumentor

SIGNALS = (
    signals.before_task_publish, signals.task_prerun, signals.task_postrun,
    signals.worker_process_shutdown, signals.task_failure, signals.task_retry,
    signals.task_unknown, signals.task_rejected,
)
WRAPPED = (
    (Task, "apply_async"), (Celery, "send_task"), (Scheduler, "apply_async"),
    (Request, "on_accepted"), (Request, "on_success"), (Request, "on_failure"),
    (Request, "on_timeout"), (Request, "reject"), (Request, "_announce_revoked"),
    (strategy, "create_request_cls"),
    # While we are instrumented, the official instrumentor's _instrument is a no-op.
    (CeleryInstrumentor, "_instrument"),
)


def our_receivers() -> int:
    """How many receivers we have connected, over every signal we use."""
    return sum(
        1 for signal in SIGNALS for key, _ in signal.receivers
        if isinstance(key[0], str) and key[0].startswith("otel_celery_headers.")
    )


def wrapped(owner: type, name: str) -> bool:
    return isinstance(vars(owner)[name], wrapt.FunctionWrapper)


def nothing_instrumented() -> bool:
    """No method of ours wrapped and no receiver of ours connected."""
    return not any(wrapped(owner, name) for owner, name in WRAPPED) and our_receivers() == 0


def fully_instrumented() -> bool:
    """Every method we wrap wrapped, every receiver connected."""
    return all(wrapped(owner, name) for owner, name in WRAPPED) and our_receivers() == len(SIGNALS)
