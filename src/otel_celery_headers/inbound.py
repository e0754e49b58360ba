"""What the worker reads from a message: the producer's context, and facts about it.

Pure functions over ``task.request`` (or message headers read the same way), shared by
the child's CONSUMER span (consumer.py) and the worker's main process: its spans
(mainprocess.py), delivery metrics and exemplars (deliveries.py), log context
(logcontext.py).
"""

from __future__ import annotations

import math
import re
import time
from datetime import datetime
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import (
    INVALID_SPAN,
    Link,
    NonRecordingSpan,
    SpanContext,
    TraceFlags,
)

from . import attributes as attrs
from ._guard import report
from .beat import entry_of
from .carrier import (
    CONTEXT_HEADER,
    PREVIOUS_ATTEMPT_HEADER,
    SENT_AT_HEADER,
    STRING_GETTER,
    TRACE_SHAPE_HEADER,
    inbound_carrier,
    own_header,
    parse_span_ref,
    propagator_fields,
)
from .options import TraceShape, _shape


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


def asked_shape(asked: object, configured: TraceShape) -> TraceShape:
    """The shape a message's TRACE_SHAPE_HEADER asks for; ``configured`` if it is not
    one (logged once: a hand-written beat entry header with a typo)."""
    shape = _shape(asked)
    if shape is None:
        report(
            "trace shape header",
            ValueError(f"{asked!r} is not one of child, link, ignore: using {configured}"),
        )
        return configured
    return shape


def shape_of(configured: TraceShape, carrier: object) -> TraceShape:
    """The shape of one message: its header's, unless the worker's rule is ``ignore``.

    For the worker's main process (its spans: mainprocess.py; its failure and log
    contexts and exemplars: deliveries.py, logcontext.py); the pool child's hot path
    does the same inline (consumer.py).
    """
    if configured == "ignore":
        return configured
    asked = own_header(carrier, TRACE_SHAPE_HEADER)
    return configured if asked is None else asked_shape(asked, configured)


def extract(carrier: object) -> Context:
    """The producer's context from a request or headers; a fresh Context if none.

    Never the thread's current context: a worker thread must not hand one task's
    context to the next (solo, threads and gevent pools reuse threads and greenlets).
    """
    try:
        textmap = propagate.get_global_textmap()
        carried = inbound_carrier(carrier, propagator_fields(textmap))
        return textmap.extract(carried, context=Context(), getter=STRING_GETTER)
    except Exception as exc:  # noqa: BLE001 - a malformed header starts a new trace
        report("extract", exc)
        return Context()


# W3C trace context, version 00, lowercase hex (what the SDK's propagator accepts).
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


def exemplar_context(carrier: object) -> Context:
    """A Context holding the producer's span, for a metric exemplar and nothing else.

    The worker's main process records the delivery metrics of every task, on one
    thread for the whole pool, and needs the producer's span only to point the
    histograms' exemplars at the task's trace. A full ``propagate.extract`` (the
    composite propagator, its regular expressions, baggage) was the largest single
    cost there (issue 18); our ``traceparent`` alone names the span. A message without
    one (another propagator, such as B3) is extracted in full, as before; a malformed
    one gives no exemplar. Never a context to run code in: it has no baggage.
    """
    textmap = propagate.get_global_textmap()
    fields = propagator_fields(textmap)
    if "traceparent" not in fields:
        return extract(carrier)
    # Our own message (the usual one): the marker names the fields we wrote at the top
    # level, so the traceparent is read there without building inbound_carrier's dict.
    # What the worker's log lines pay per delivery (issue 17).
    own = getattr(carrier, "__dict__", None)
    marker = own.get(CONTEXT_HEADER) if type(own) is dict else None
    if type(marker) is str and "traceparent" in marker.split():
        value = own.get("traceparent")  # type: ignore[union-attr]
    else:
        try:
            # The one place our context is read from (carrier.inbound_carrier), as extract().
            value = inbound_carrier(carrier, fields).get("traceparent")
        except Exception as exc:  # noqa: BLE001 - no exemplar rather than a broken delivery
            report("exemplar context", exc)
            return Context()
        if value is None:
            return extract(carrier)
    match = _TRACEPARENT.fullmatch(value) if type(value) is str else None
    if match is None:
        return Context()
    span_context = SpanContext(
        int(match[1], 16), int(match[2], 16), True,
        _SAMPLED if match[3][1] in _ODD_HEX else _NOT_SAMPLED,
    )
    if not span_context.is_valid:  # all-zero ids
        return Context()
    return trace.set_span_in_context(NonRecordingSpan(span_context), _EMPTY_CONTEXT)


# The sampled flag is the low bit of the flags' second hex digit.
_ODD_HEX = frozenset("13579bdf")
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_NOT_SAMPLED = TraceFlags(TraceFlags.DEFAULT)
# Contexts are immutable: set_span_in_context copies it.
_EMPTY_CONTEXT = Context()


_FROM_REQUEST = (*attrs.MESSAGE_FACTS, ("hostname", attrs.CELERY_WORKER_HOSTNAME))


def request_attributes(request: Any, into: dict[str, Any]) -> None:
    """Celery facts of a ``task.request`` (or a message's headers) as span attributes."""
    for key, attr in _FROM_REQUEST:
        value = getattr(request, key, None)
        if isinstance(value, str):
            into[attr] = value
    retries = getattr(request, "retries", 0)
    into[attrs.CELERY_TASK_RETRIES] = retries if isinstance(retries, int) else 0
    entry = entry_of(request)
    if entry is not None:
        into[attrs.CELERY_BEAT_ENTRY] = entry


def redelivered(delivery_info: Any) -> bool:
    """Whether the broker marked this delivery as one it made before.

    Celery's Request copies kombu's ``delivery_info["redelivered"]`` into the
    ``delivery_info`` it keeps and hands to the pool (celery/worker/request.py, 5.3 to
    5.7). py-amqp gives AMQP's flag: the message went to a consumer before and was
    rejected with requeue, or its channel closed with it unacknowledged. kombu's Redis
    transport sets it on a message it restores from its ``unacked`` hash (after
    ``visibility_timeout``, or at a consumer's close). One dict lookup: every task.
    """
    return isinstance(delivery_info, dict) and delivery_info.get("redelivered") is True


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
