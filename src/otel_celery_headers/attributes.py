"""Attribute names and values: OpenTelemetry messaging conventions, plus ``celery.*``.

Names come from ``opentelemetry.semconv`` where a constant exists. The messaging
conventions are still incubating upstream, hence the ``_incubating`` import (the
official contrib instrumentations do the same).
"""

from __future__ import annotations

import weakref
from typing import Any, Final

from opentelemetry.semconv._incubating.attributes.messaging_attributes import (
    MESSAGING_DESTINATION_NAME,
    MESSAGING_MESSAGE_CONVERSATION_ID,
    MESSAGING_MESSAGE_ID,
    MESSAGING_OPERATION_NAME,
    MESSAGING_OPERATION_TYPE,
    MESSAGING_SYSTEM,
)
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.trace import get_current_span

__all__ = [
    "ERROR_TYPE",
    "MESSAGING_DESTINATION_NAME",
    "MESSAGING_MESSAGE_CONVERSATION_ID",
    "MESSAGING_MESSAGE_ID",
    "MESSAGING_OPERATION_NAME",
    "MESSAGING_OPERATION_TYPE",
    "MESSAGING_SYSTEM",
]

# Celery facts that have no semantic convention.
CELERY_TASK_NAME: Final = "celery.task.name"
CELERY_TASK_RETRIES: Final = "celery.task.retries"
CELERY_TASK_STATE: Final = "celery.task.state"
CELERY_TASK_PARENT_ID: Final = "celery.task.parent_id"
CELERY_TASK_GROUP_ID: Final = "celery.task.group_id"
CELERY_TASK_ETA: Final = "celery.task.eta"
CELERY_TASK_EAGER: Final = "celery.task.eager"
CELERY_WORKER_HOSTNAME: Final = "celery.worker.hostname"
CELERY_QUEUE_TIME: Final = "celery.message.queue_time"
CELERY_RETRY_REASON: Final = "celery.retry.reason"
CELERY_TRACE_SHAPE: Final = "celery.trace_shape"
CELERY_REVOKED: Final = "celery.task.revoked"
CELERY_REVOKED_REASON: Final = "celery.task.revoked.reason"
CELERY_DELIVERY_REQUEUED: Final = "celery.delivery.requeued"
# The broker delivered this message before (AMQP's basic.deliver redelivered flag;
# kombu's Redis transport sets it on a message it restores). No semantic convention.
CELERY_DELIVERY_REDELIVERED: Final = "celery.delivery.redelivered"
CELERY_BEAT_ENTRY: Final = "celery.beat.entry"

# Task facts a message carries (protocol 2 headers, protocol 1 body, ``task.request``),
# copied onto both spans when they are strings: (message key, attribute).
MESSAGE_FACTS: Final = (
    ("root_id", MESSAGING_MESSAGE_CONVERSATION_ID),
    ("parent_id", CELERY_TASK_PARENT_ID),
    ("group", CELERY_TASK_GROUP_ID),
    ("eta", CELERY_TASK_ETA),
)

OPERATION_SEND: Final = "send"
OPERATION_PROCESS: Final = "process"


def start_attributes(system: str, operation: str, destination: str, task: str) -> dict[str, str]:
    """The attributes a span is started with: what a sampler sees.

    What a sampling rule keys on (the broker, send or process, the queue, the task);
    every other attribute is set only on a span that records, so an unsampled message
    does not pay for attributes nobody reads (docs/reference/spans.md, "What a sampler sees").
    """
    return {
        MESSAGING_SYSTEM: system,
        MESSAGING_OPERATION_TYPE: operation,
        MESSAGING_DESTINATION_NAME: destination,
        CELERY_TASK_NAME: task,
    }

def metric_attributes(
    system: str,
    operation: str,
    task: str,
    destination: str | None = None,
    *,
    beat_entry: str | None = None,
    redelivered: bool = False,
) -> dict[str, Any]:
    """What every point of our publish and delivery metrics carries (a new dict: the
    caller adds the outcome to it). No destination for a publish that failed before
    its message was routed; the beat entry of a delivery `celery beat` sent (bounded:
    the schedule's entries).

    ``celery.delivery.redelivered`` only when true: a first delivery's series keep the
    attributes they always had, and a redelivery adds at most one series beside each
    (a bool has one true value), so a dashboard can tell redeliveries apart without
    doubling every series that never sees one.
    """
    found: dict[str, Any] = {
        MESSAGING_SYSTEM: system,
        MESSAGING_OPERATION_NAME: operation,
        CELERY_TASK_NAME: task,
    }
    if destination is not None:
        found[MESSAGING_DESTINATION_NAME] = destination
    if beat_entry is not None:
        found[CELERY_BEAT_ENTRY] = beat_entry
    if redelivered:
        found[CELERY_DELIVERY_REDELIVERED] = True
    return found


try:
    # The key under which the API keeps the current span in a Context. Private, but
    # read directly it spares get_current_span()'s isinstance() against the Span ABC,
    # a measurable share of an unsampled message (issue 12). tests/test_attributes.py
    # pins that both give the same answer.
    from opentelemetry.trace.propagation import _SPAN_KEY as _API_SPAN_KEY

    _SPAN_KEY: str | None = _API_SPAN_KEY
except ImportError:  # pragma: no cover - a future API without it: the public way
    _SPAN_KEY = None


def parent_sampled(context: Any) -> bool | None:
    """Whether the span in ``context`` is sampled; None when it holds no valid span.

    The SDK's default sampler (ParentBased) follows the flag for a valid parent and
    asks its root sampler otherwise. A hint for how to start a span cheaply, never
    what it records: the span gets the same attributes whichever way it goes.
    """
    span = context.get(_SPAN_KEY) if _SPAN_KEY is not None else get_current_span(context)
    try:
        span_context = span.get_span_context()
    except AttributeError:  # no span (None), or something else under the key
        return None
    if span_context.trace_flags & 0x01:
        # Not checked for validity: the API's invalid context is unsampled, and
        # propagators drop a context with a zero id; a wrong hint costs time only.
        return True
    return False if span_context.is_valid else None


# Broker URL scheme -> messaging.system. Redis has no value in the incubating enum
# yet; "redis" is what the conventions' issue tracker and the Redis instrumentations use.
_SYSTEMS: Final[dict[str, str]] = {
    "amqp": "rabbitmq",
    "amqps": "rabbitmq",
    "pyamqp": "rabbitmq",
    "librabbitmq": "rabbitmq",
    "redis": "redis",
    "rediss": "redis",
    "sentinel": "redis",
    "sqs": "aws_sqs",
    "kafka": "kafka",
    "memory": "memory",
    "filesystem": "filesystem",
    "gcpubsub": "gcp_pubsub",
    "azureservicebus": "servicebus",
}

# Per app, held weakly: an app that goes away takes its entry with it.
_system_by_app: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


# The last app asked about: a process publishes and works through one app almost
# always, and a WeakKeyDictionary lookup makes a weakref on every call.
_last: tuple[Any, str] = (None, "")


def messaging_system(app: Any) -> str:
    """The broker kind of ``app``, from its broker URL scheme (cached per app)."""
    global _last
    last_app, last_system = _last
    if app is last_app:
        return last_system
    try:
        system = _system_by_app.get(app)
    except TypeError:  # not weak-referenceable: compute every time
        system = None
    if system is None:
        try:
            url = app.conf.broker_url or "amqp://"
            scheme = str(url).split(";", 1)[0].split("://", 1)[0].split("+")[-1].lower()
        except Exception:  # noqa: BLE001 - an unreadable config must not break a publish
            scheme = ""
        system = _SYSTEMS.get(scheme, scheme or "unknown")
        try:
            _system_by_app[app] = system
        except TypeError:
            return system
    # A strong reference to one app: apps live as long as the process anyway.
    _last = (app, system)
    return system
