"""Propagator Getter/Setter over the shapes in which Celery messages carry headers.

Pure functions over dicts and ``task.request``; no Celery import, unit-tested alone.

Our context is one unit: ``traceparent``, ``tracestate`` and ``baggage`` (whatever fields
the configured propagator has) are written to, and read from, one place of a message,
never one field from here and another from there. Other systems write headers of the
same names beside ours (issue 18): Sentry's Celery integration writes its ``baggage``
(8 ``sentry-*`` members) at the top level and again in a nested ``headers["headers"]``
dict, with ``sentry-trace``; ddtrace writes W3C ``traceparent``/``tracestate``
(``dd=...``) and ``x-datadog-*`` into that nested dict only. Read as ours, Sentry's
members became the task's OpenTelemetry baggage (getsentry/sentry-python#4408) and
ddtrace's trace state joined our trace.

How ours is told from theirs: ``CONTEXT_HEADER`` (``otel_celery_context``), a top-level
header our producer writes on every message it publishes, names the fields it wrote at
the top level ("traceparent tracestate baggage", or fewer, or ""). A marked message's
context is exactly those top-level fields: a field it does not name is not ours, wherever
it is. A marker costs one short string per message and one split per task, where writing
the context twice under keys of our own would double the bytes of baggage (up to 8 kB)
on every message. The top level stays where the fields are, since that is what the
official ``opentelemetry-instrumentation-celery`` writes and reads (``propagate.inject``
into the publish headers, ``getattr(task.request, key)``): a fleet that mixes it and us
keeps one trace both ways.

A message without the marker comes from the official instrumentation, an older version
of ours, the seed article, or a hand-written producer. Its context is the first of these
places that holds a string under one of the propagator's fields, all fields from there:

1. ``task.request.<key>``: top-level message headers become attributes of the request
   (Celery's protocol 2, and protocol 1 through ``hybrid_to_proto2``), except a field
   holding the same string as a nested ``headers`` dict with Sentry's ``sentry-trace``:
   Sentry's top-level copy of its own baggage.
2. ``task.request.headers[<key>]``: the custom headers Celery keeps apart (5.3+), and
   what an eager ``apply(headers=...)`` passes; in a worker, when the message has a
   nested ``headers`` dict, that dict.
3. ``task.request.headers["headers"][<key>]``: a nested dict.
4. ``task.request.otel_context[<key>]``: the dict of the seed article
   (``apply_async(headers={"otel_context": carrier})``), also looked for in 2.

A dict of 2 or 3 is foreign, and skipped, when it carries Sentry's ``sentry-trace``,
Datadog's ``x-datadog-trace-id``/``x-datadog-parent-id``, or a ``tracestate`` with a
``dd=`` member (ddtrace with only ``tracecontext`` propagation, as ``OTEL_PROPAGATORS``
gives it through its remapping). Only ``str`` values are accepted: a number, list or
dict under a trace key is treated as absent, so the task starts a new trace instead of
failing.

On publish (``write_context``), a stale context of ours (retry, ``replace()``, a received
message's headers re-published) is removed: the fields an earlier marker names, or, on
an unmarked message whose context is about to be replaced, any top-level field, except
Sentry's top-level copy, which stays unless we write that same field (Sentry reads the
nested copy, which we never touch).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

from opentelemetry.propagators.textmap import Getter, TextMapPropagator
from opentelemetry.trace import SpanContext, TraceFlags

#: The header carrying the publish time (seconds since the epoch, as a string), used
#: for time in queue. A string, not a float: AMQP header tables and JSON both keep it
#: exactly, and the official instrumentation ignores it.
SENT_AT_HEADER = "otel_celery_sent_at"

#: On a retry's message: ``<trace id>-<span id>`` of the attempt that asked for it, so
#: the next attempt's span links to the previous one.
PREVIOUS_ATTEMPT_HEADER = "otel_celery_previous_attempt"

#: ``child``, ``link`` or ``ignore``: the trace shape the publisher asks for this
#: message (``with trace_shape(...)``, or a beat entry's ``options["headers"]``); the
#: worker honours it over its per-task ``trace_shape`` option, except ``ignore`` there.
TRACE_SHAPE_HEADER = "otel_celery_trace_shape"

#: On every message our producer publishes: the names of the propagation fields it
#: wrote at the top level, space-separated (see the module docstring).
CONTEXT_HEADER = "otel_celery_context"

#: The seed article's nested carrier.
SEED_CARRIER_KEY = "otel_context"
#: Sentry's and Datadog's nested carrier.
NESTED_CARRIER_KEY = "headers"


def _mapping(value: object) -> Mapping[str, Any] | None:
    # type() first: Celery's headers are plain dicts, and an isinstance() against the
    # Mapping ABC costs several times more; it runs on every lookup of every task.
    if value is None:  # the usual miss: skip the ABC check below
        return None
    if type(value) is dict or isinstance(value, Mapping):
        return value
    return None


#: Keys that mark a dict as Sentry's or Datadog's carrier: both always write one of
#: them beside any W3C field of theirs (Sentry's Celery integration, ddtrace's
#: ``_inject_distributed_headers`` with its default propagation styles).
#: Sentry's own trace header, always beside its baggage.
SENTRY_TRACE_HEADER = "sentry-trace"
_FOREIGN_KEYS = (SENTRY_TRACE_HEADER, "x-datadog-trace-id", "x-datadog-parent-id")

_EMPTY: Mapping[str, Any] = {}


def _foreign(mapping: Mapping[str, Any]) -> bool:
    """Whether a dict is Sentry's or Datadog's carrier, not one of an OpenTelemetry producer."""
    for key in _FOREIGN_KEYS:
        if key in mapping:
            return True
    state = mapping.get("tracestate")
    # ddtrace with only W3C propagation writes no x-datadog-* key, but always its own
    # "dd=" member in tracestate.
    return (
        isinstance(state, str)
        and "dd=" in state
        and any(member.strip(" \t").startswith("dd=") for member in state.split(","))
    )


def _holds_any(mapping: Mapping[str, Any], fields: Iterable[str]) -> bool:
    for name in fields:
        if isinstance(mapping.get(name), str):
            return True
    return False


def _top(request: object) -> dict[str, Any]:
    # task.request (a Context) and the main process's wrapper of message headers keep
    # them in the instance __dict__, where a missing key is a dict miss rather than a
    # caught AttributeError. An object without one has no headers to read.
    own = getattr(request, "__dict__", None)
    return own if type(own) is dict else {}


def inbound_carrier(request: object, fields: Iterable[str]) -> Mapping[str, Any]:
    """The one place of a Celery request that holds the producer's context.

    Read with ``STRING_GETTER``; ``fields`` (the propagator's) are looked at only for a
    message without our marker. Never raises on odd values: a place that is not a dict
    is no place.
    """
    top = _top(request)
    marker = top.get(CONTEXT_HEADER)
    if isinstance(marker, str):  # ours: exactly the fields it names, from the top level
        found: dict[str, Any] = {}
        for name in marker.split():
            value = top.get(name)
            if isinstance(value, str):
                found[name] = value
        return found
    headers = _mapping(top.get("headers"))
    # Sentry's nested dict: a top-level field holding the same string is its copy. (Its
    # signature key, not _foreign(): in a worker, request.headers is Celery's copy of
    # the top-level custom headers when the message has no nested dict, and that copy
    # holds the same strings as the top level.)
    sentry = headers is not None and SENTRY_TRACE_HEADER in headers
    copied: list[str] = []
    held = False
    for name in fields:
        value = top.get(name)
        if isinstance(value, str):
            if sentry and headers is not None and headers.get(name) == value:
                copied.append(name)
            else:
                held = True
    if held:
        return {k: v for k, v in top.items() if k not in copied} if copied else top
    nested = None if headers is None else _mapping(headers.get(NESTED_CARRIER_KEY))
    for place in (headers, nested):
        if place is not None and not _foreign(place) and _holds_any(place, fields):
            return place
    seed = _mapping(top.get(SEED_CARRIER_KEY))
    if seed is None and headers is not None:
        seed = _mapping(headers.get(SEED_CARRIER_KEY))
    if seed is not None and _holds_any(seed, fields):
        return seed
    return _EMPTY


def own_header(request: object, key: str) -> str | None:
    """One of our own ``otel_celery_*`` headers, or None.

    We write them at the top level of a message only, so they are read there, and in
    ``request.headers`` (where an eager ``apply(headers=...)`` puts them), not in the
    nested places other producers use for trace context: a miss stays cheap, and every
    task looks for headers most messages do not have (previous attempt, chord links).
    """
    own = getattr(request, "__dict__", None)
    if type(own) is dict:
        value = own.get(key)
        headers = own.get("headers")
    else:
        value = getattr(request, key, None)
        headers = getattr(request, "headers", None)
    if isinstance(value, str):
        return value
    if headers is None or (type(headers) is not dict and _mapping(headers) is None):
        return None
    value = headers.get(key)
    return value if isinstance(value, str) else None


# (propagator, its fields): CompositePropagator.fields builds a new set on every call,
# and the global propagator can be replaced at any time. Read on every publish (which
# fields to write) and every task (which to look for).
_fields_of: tuple[TextMapPropagator | None, frozenset[str]] = (None, frozenset())


def propagator_fields(textmap: TextMapPropagator) -> frozenset[str]:
    """``textmap.fields``, cached for the propagator object in use."""
    global _fields_of
    known, fields = _fields_of
    if known is not textmap:
        fields = frozenset(textmap.fields)
        _fields_of = (textmap, fields)
    return fields


class StringGetter(Getter[Mapping[str, Any]]):
    """Reads a field of ``inbound_carrier``'s mapping: a string, or nothing."""

    def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
        value = carrier.get(key)
        return [value] if isinstance(value, str) else None

    def keys(self, carrier: Mapping[str, Any]) -> list[str]:
        return [key for key in carrier if isinstance(key, str)]


STRING_GETTER = StringGetter()


def write_context(
    headers: MutableMapping[str, Any],
    written: Mapping[str, str],
    fields: Iterable[str],
    replaces: bool,
) -> None:
    """Put our context (``written``, what the propagator injected) into a message's
    top-level ``headers``, with the marker naming its fields, in place of a stale one.

    ``Task.retry()`` and ``replace()`` republish the previous attempt's headers: the
    fields its marker names are that attempt's context and go. Without a marker (a
    message of the official instrumentation or an older version of ours), any field of
    ``fields`` present goes if ``replaces`` (we have a valid context to put there), as
    before the marker existed. Never removed: a field holding the same string as a nested
    dict with Sentry's ``sentry-trace``: Sentry's top-level copy of its own baggage.
    """
    stale = headers.get(CONTEXT_HEADER)
    candidates: Iterable[str] = (
        stale.split() if isinstance(stale, str) else fields if replaces else ()
    )
    looked = False
    theirs: Mapping[str, Any] | None = None
    for name in candidates:
        value = headers.get(name)
        if value is None or name in written:
            continue  # absent, or overwritten below anyway
        if not looked:  # only on a republished message: no lookup on a first publish
            looked = True
            theirs = _mapping(headers.get(NESTED_CARRIER_KEY))
            if theirs is not None and SENTRY_TRACE_HEADER not in theirs:
                theirs = None
        if theirs is not None and theirs.get(name) == value:
            continue  # Sentry's top-level copy of its own baggage
        del headers[name]
    headers.update(written)
    headers[CONTEXT_HEADER] = " ".join(written)


def bound_baggage(value: str, max_bytes: int) -> tuple[str, int]:
    """Cut a W3C ``baggage`` header to at most ``max_bytes``, keeping whole members.

    Members are kept in order until the next one would not fit; returns the bounded
    value and how many members were dropped.
    """
    if len(value.encode("utf-8")) <= max_bytes:
        return value, 0
    kept: list[str] = []
    size = 0
    members = value.split(",")
    for member in members:
        cost = len(member.encode("utf-8")) + (1 if kept else 0)
        if size + cost > max_bytes:
            break
        kept.append(member)
        size += cost
    return ",".join(kept), len(members) - len(kept)


_SPAN_REF = re.compile(r"[0-9a-f]{32}-[0-9a-f]{16}")


def span_ref(context: SpanContext) -> str:
    """``<trace id>-<span id>`` in hex: how our own headers name another span."""
    return f"{context.trace_id:032x}-{context.span_id:016x}"


def parse_span_ref(value: str) -> SpanContext | None:
    """The remote span named by ``span_ref``, or None if ``value`` is not one.

    Only spans that were recorded are named, so the context is marked sampled.
    """
    # Strict: int(x, 16) alone would also take " 1f", "0x1f" and "1_f".
    if _SPAN_REF.fullmatch(value) is None:
        return None
    context = SpanContext(
        trace_id=int(value[:32], 16),
        span_id=int(value[33:], 16),
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )
    return context if context.is_valid else None
