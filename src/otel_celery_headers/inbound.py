"""What the worker reads from a message: the producer's context, and facts about it.

Pure functions over ``task.request`` (or message headers read the same way), shared by
the child's CONSUMER span (consumer.py) and the main process's spans (mainprocess.py).
"""

from __future__ import annotations

import math
import time
from datetime import datetime
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import INVALID_SPAN, Link

from . import attributes as attrs
from ._guard import report
from .carrier import (
    PREVIOUS_ATTEMPT_HEADER,
    REQUEST_GETTER,
    SENT_AT_HEADER,
    own_header,
    parse_span_ref,
)
from .options import TraceShape


class Headers:
    """Message headers (or a Request's ``request_dict``), read the way ``task.request`` is."""

    def __init__(self, headers: dict[str, Any]) -> None:
        self.__dict__ = headers  # the caller's own dict: no copy


def relate(inbound: Context, shape: TraceShape) -> tuple[Context, Context, list[Link] | None]:
    """(context made current, parent of the span, links) for a trace shape."""
    if shape == "child":
        return inbound, inbound, None
    if shape == "link":
        # A new trace that still carries the producer's baggage (the official
        # instrumentation's link mode drops it).
        remote = trace.get_current_span(inbound).get_span_context()
        base = trace.set_span_in_context(INVALID_SPAN, inbound)
        return base, base, [Link(remote)] if remote.is_valid else None
    # "ignore": the inbound context is not trusted at all.
    empty = Context()
    return empty, empty, None


def extract(carrier: object) -> Context:
    """The producer's context from a request or headers; a fresh Context if none.

    Never the thread's current context: a worker thread must not hand one task's
    context to the next (solo, threads and gevent pools reuse threads and greenlets).
    """
    try:
        return propagate.extract(carrier, context=Context(), getter=REQUEST_GETTER)
    except Exception as exc:  # noqa: BLE001 - a malformed header starts a new trace
        report("extract", exc)
        return Context()


_FROM_REQUEST = (*attrs.MESSAGE_FACTS, ("hostname", attrs.CELERY_WORKER_HOSTNAME))


def request_attributes(request: Any, into: dict[str, Any]) -> None:
    """Celery facts of a ``task.request`` (or a message's headers) as span attributes."""
    for key, attr in _FROM_REQUEST:
        value = getattr(request, key, None)
        if isinstance(value, str):
            into[attr] = value
    retries = getattr(request, "retries", 0)
    into[attrs.CELERY_TASK_RETRIES] = retries if isinstance(retries, int) else 0


def destination_of(delivery_info: Any) -> str:
    if not isinstance(delivery_info, dict):
        return ""
    name = delivery_info.get("routing_key") or delivery_info.get("exchange") or ""
    return name if type(name) is str else str(name)


def previous_attempt(request: Any) -> Link | None:
    value = own_header(request, PREVIOUS_ATTEMPT_HEADER)
    context = None if value is None else parse_span_ref(value)
    if context is None:
        return None
    return Link(context, {"celery.link": "previous_attempt"})


def queue_time(request: Any) -> float | None:
    """Seconds between publish (or the eta, if later) and now; never negative.

    A task with a countdown did not "wait" before its eta. Clocks of producer and
    worker machines differ: a negative difference is skew, reported as zero.
    """
    return waited_since(own_header(request, SENT_AT_HEADER), getattr(request, "eta", None))


def waited_since(sent: str | None, eta: object) -> float | None:
    """``queue_time`` from the publish-time header's value and the message's eta."""
    if sent is None:
        return None
    try:
        ready = float(sent)
    except ValueError:
        return None
    if not math.isfinite(ready):  # "inf", "nan": not a time, and not a metric value
        return None
    if isinstance(eta, str):
        try:
            ready = max(ready, datetime.fromisoformat(eta).timestamp())
        except ValueError:
            pass
    waited = time.time() - ready
    return waited if waited > 0.0 else 0.0  # noqa: FURB136 - not max(): a call, every task
