"""Chord fan-in: the chord body's CONSUMER span links to every header task's span.

Celery gives no process a view of the whole chord. Each header message carries its
own copy of the body signature, and whichever header finishes last publishes the body
from inside its own execution (``backend.on_chord_part_return``, called by
``mark_as_done`` before ``task_postrun``). That header cannot know the other headers'
span contexts, and the body's message carries no group id the body could look up.

The one store every header worker shares is the result backend a chord already
requires. So:

1. A header task, when its span starts, appends ``<trace id>-<span id>`` to the list
   ``<group key>.otel`` (the backend's own group key, so a configured key prefix
   applies), with the backend's result lifetime. Every header starts its span before it
   reports its part, so every entry is there before the body is sent. A list, not a key
   per ``group_index``: protocol 1 messages reach the worker without their index, and
   ``Task.add_to_chord`` reuses its caller's.
2. When the finishing header publishes the body (recognised by the body's frozen task
   id, or its group id for a group body), the producer reads the list with one
   ``LRANGE`` and puts it in the body message's ``otel_celery_chord_headers`` header.
3. The body's CONSUMER span parses that header and starts with one link per header.

Costs fall on chords only: one Redis round trip per header task (RPUSH and EXPIRE in a
pipeline), one per body (LRANGE), a header of about 50 bytes per link (at most
``MAX_LINKS``, the SDK's default link limit; a retried header is there once per attempt).

Only the Redis result backend (and Sentinel) takes part: it is what our users run, a
list is one round trip to append to or to read, and keys expire. Our calls go through
a client of their own with a short timeout (``TIMEOUT_S``), not the backend's (whose
socket timeout is 120 s by default, and which retries): a Redis that hangs costs a
chord header at most that long, and after any error the fan-in pauses for ``PAUSE_S``
in this process, so an outage costs one timeout per pause, not one per task. Other
backends get no links; the body stays a child of the last header, as before.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry.trace import Link, SpanContext

from ._guard import report
from .carrier import parse_span_ref, span_ref

#: Body message header: space-separated ``<trace id>-<span id>`` of the header spans.
CHORD_LINKS_HEADER = "otel_celery_chord_headers"

#: At most this many links (the SDK's default ``OTEL_SPAN_LINK_COUNT_LIMIT``); a
#: chord with more headers links to the first ones to start.
MAX_LINKS = 128
_DEFAULT_TTL_S = 86400
#: Socket timeout of our Redis calls (connect and reply); a healthy Redis answers in
#: well under a millisecond.
TIMEOUT_S = 0.5
#: After an error, no fan-in work in this process for this long.
PAUSE_S = 30.0

_paused_until = 0.0
_clients: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()

LINK_ATTRIBUTES: Mapping[str, str] = {"celery.link": "chord_header"}


@dataclass
class ChordPart:
    """A header task of a chord, as its worker sees it."""

    backend: Any
    group_id: str
    # Ids a message of the body is published under: the body's frozen task id, a
    # chain body's first task's, a group body's tasks' (checked against the group id too).
    body_ids: frozenset[str]
    # What collect() read, kept: a group body publishes one message per task.
    links: str | None = None
    collected: bool = False


def part_of(request: Any, backend: Any) -> ChordPart | None:
    """The chord this request is a header of, if its backend can hold our keys."""
    body = getattr(request, "chord", None)
    if not isinstance(body, Mapping):
        return None
    group_id = getattr(request, "group", None)
    if not isinstance(group_id, str) or not _is_redis(backend):
        return None
    return ChordPart(backend, group_id, _entry_ids(body))


def _is_redis(backend: Any) -> bool:
    try:
        from celery.backends.redis import RedisBackend
    except ImportError:  # pragma: no cover - Celery always ships it
        return False
    return isinstance(backend, RedisBackend)


def _client(backend: Any) -> Any:
    """A Redis client of the backend's server with our short timeouts (one per backend)."""
    client = _clients.get(backend)
    if client is None:
        params = dict(backend.connparams)
        params["socket_timeout"] = TIMEOUT_S
        if "path" not in params:  # a unix socket connection takes no connect timeout
            params["socket_connect_timeout"] = TIMEOUT_S
        params["retry_on_timeout"] = False
        # The backend's own factory: the same server, TLS, credentials and Sentinel
        # discovery as the backend, only the timeouts are ours.
        client = backend._create_client(**params)
        _clients[backend] = client
    return client


def _paused() -> bool:
    return time.monotonic() < _paused_until


def _failed(where: str, exc: Exception) -> None:
    global _paused_until
    _paused_until = time.monotonic() + PAUSE_S
    report(where, exc)


def _entry_ids(body: Mapping[str, Any]) -> frozenset[str]:
    ids: set[str] = set()
    options = body.get("options")
    if isinstance(options, Mapping) and isinstance(options.get("task_id"), str):
        ids.add(options["task_id"])
    kind = body.get("subtask_type")
    if kind in ("chain", "group"):
        kwargs = body.get("kwargs")
        tasks = kwargs.get("tasks") if isinstance(kwargs, Mapping) else None
        if isinstance(tasks, (list, tuple)):
            # A chain is entered through its first task, a group through each of its.
            for task in tasks[:1] if kind == "chain" else tasks:
                if isinstance(task, Mapping):
                    ids |= _entry_ids(task)
    return frozenset(ids)


def _key(part: ChordPart) -> Any:
    return part.backend.get_key_for_group(part.group_id, ".otel")


def remember(part: ChordPart, context: SpanContext) -> None:
    """Append this header's span context to the chord's list, for the body's links."""
    if not context.trace_flags.sampled or _paused():
        return  # nothing recorded to link to, or Redis failed a moment ago
    try:
        key = _key(part)
        pipe = _client(part.backend).pipeline(transaction=False)
        pipe.rpush(key, span_ref(context))
        pipe.expire(key, int(part.backend.expires or _DEFAULT_TTL_S))
        pipe.execute()
    except Exception as exc:  # noqa: BLE001 - the chord must run on without links
        _failed("chord header store", exc)


def collect(part: ChordPart) -> str | None:
    """The stored header span contexts, as the body message's header value."""
    if part.collected:
        return part.links
    part.collected = True
    if _paused():
        return None
    try:
        values = _client(part.backend).lrange(_key(part), 0, MAX_LINKS - 1)
    except Exception as exc:  # noqa: BLE001
        _failed("chord header read", exc)
        return None
    found: list[str] = []
    for value in values:
        if isinstance(value, bytes):
            value = value.decode("ascii", "replace")
        if isinstance(value, str) and parse_span_ref(value) is not None:
            found.append(value)
    part.links = " ".join(found) or None
    return part.links


def links_from(value: str | None) -> list[Link]:
    """Links for the body span from the ``otel_celery_chord_headers`` value."""
    if not value:
        return []
    links: list[Link] = []
    for item in value.split(" "):
        context = parse_span_ref(item)
        if context is not None:
            links.append(Link(context, LINK_ATTRIBUTES))
            if len(links) == MAX_LINKS:
                break
    return links
