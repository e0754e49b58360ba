"""Propagator Getter/Setter over the shapes in which Celery messages carry headers.

Pure functions over dicts and ``task.request``; no Celery import, unit-tested alone.

Where a producer's context can be found on the worker, in the order we look:

1. ``task.request.<key>``: top-level message headers become attributes of the request
   (Celery's protocol 2, and protocol 1 through ``hybrid_to_proto2``). We and the
   official ``opentelemetry-instrumentation-celery`` write here.
2. ``task.request.headers[<key>]``: the custom headers Celery keeps apart (5.3+), and
   what an eager ``apply(headers=...)`` passes.
3. ``task.request.headers["headers"][<key>]``: a nested dict, how Sentry and Datadog
   write their headers so they survive every Celery version.
4. ``task.request.otel_context[<key>]``: the dict of the seed article
   (``apply_async(headers={"otel_context": carrier})``).

Only ``str`` values are accepted: a number, list or dict under a trace key is treated
as absent, so the task starts a new trace instead of failing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

from opentelemetry.propagators.textmap import Getter, Setter
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


def _nested(mapping: object, key: str) -> Mapping[str, Any] | None:
    outer = _mapping(mapping)
    return None if outer is None else _mapping(outer.get(key))


# The getter and own_header run three to five times per task (traceparent, tracestate
# and baggage for extract; publish time, chord links), mostly to miss: they read the
# request's instance __dict__ inline instead of through small helpers, since at this
# rate each Python call is a measurable share of an unsampled task (issue 12).
# task.request (a Context) and the main process's SimpleNamespace keep headers in the
# instance __dict__, where a missing key is a dict miss rather than a caught
# AttributeError; anything else is read with getattr.


def find_header(request: object, key: str) -> str | None:
    """Return the string value of header ``key`` on a Celery request, or None.

    The worker's main process passes message headers wrapped in a SimpleNamespace, so
    everything here reads attributes, the shape of ``task.request``.
    """
    found = REQUEST_GETTER.get(request, key)
    return None if found is None else found[0]


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


class RequestGetter(Getter[Any]):
    """Reads propagation fields from ``task.request``: ``find_header``'s lookup, here
    rather than called from here, since propagators call this once per field."""

    def get(self, carrier: Any, key: str) -> list[str] | None:
        own = getattr(carrier, "__dict__", None)
        if type(own) is dict:
            value = own.get(key)
            if isinstance(value, str):
                return [value]
            headers = own.get("headers")
            seed = own.get(SEED_CARRIER_KEY)
        else:
            value = getattr(carrier, key, None)
            if isinstance(value, str):
                return [value]
            headers = getattr(carrier, "headers", None)
            seed = getattr(carrier, SEED_CARRIER_KEY, None)
        # None is the usual miss; a plain dict the usual hit: no call for either.
        if seed is not None and type(seed) is not dict:
            seed = _mapping(seed)
        if headers is not None and (type(headers) is dict or _mapping(headers) is not None):
            value = headers.get(key)
            if isinstance(value, str):
                return [value]
            nested = headers.get(NESTED_CARRIER_KEY)
            if nested is not None and (type(nested) is dict or _mapping(nested) is not None):
                value = nested.get(key)
                if isinstance(value, str):
                    return [value]
            if seed is None:
                seed = headers.get(SEED_CARRIER_KEY)
                if seed is not None and type(seed) is not dict:
                    seed = _mapping(seed)
        if seed is not None:
            value = seed.get(key)
            if isinstance(value, str):
                return [value]
        return None

    def keys(self, carrier: Any) -> list[str]:
        found: list[str] = []
        custom = getattr(carrier, "headers", None)
        for source in (
            custom,
            _nested(custom, NESTED_CARRIER_KEY),
            getattr(carrier, SEED_CARRIER_KEY, None),
        ):
            if isinstance(source, Mapping):
                found.extend(k for k in source if isinstance(k, str))
        return found


REQUEST_GETTER = RequestGetter()


class HeaderSetter(Setter[MutableMapping[str, Any]]):
    """Writes propagation fields as top-level string headers, overwriting stale ones.

    ``Task.retry()`` republishes the previous attempt's headers, so an existing value
    is the old attempt's context and must be replaced, never kept (no ``setdefault``).
    """

    def set(self, carrier: MutableMapping[str, Any], key: str, value: str) -> None:
        carrier[key] = value


def drop_fields(headers: MutableMapping[str, Any], fields: Iterable[str]) -> None:
    """Remove propagation fields copied from an earlier message (retry, replace)."""
    for field in fields:
        headers.pop(field, None)


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
