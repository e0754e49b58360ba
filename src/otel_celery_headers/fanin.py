"""Chord fan-in: the chord body's CONSUMER span links to every header task's span.

Celery gives no process a view of the whole chord. Each header message carries its
own copy of the body signature, and whichever header finishes last publishes the body
from inside its own execution (``backend.on_chord_part_return``, called by
``mark_as_done`` before ``task_postrun``). That header cannot know the other headers'
span contexts, and the body's message carries no group id the body could look up.

The one store every header worker shares is the result backend a chord already
requires. So:

1. A header task, when its span starts, writes ``<trace id>-<span id>`` under
   ``<group key>.otel.<group_index>`` (the backend's own group key, so a configured
   key prefix applies), with the backend's result lifetime. Every header starts its
   span before it reports its part, so every key is written before the body is sent.
2. When the finishing header publishes the body (recognised by the body's frozen task
   id, or its group id for a group body), the producer reads those keys with one
   ``mget`` (two for chords over 16 headers) and puts them in the body message's
   ``otel_celery_chord_headers`` header.
3. The body's CONSUMER span parses that header and starts with one link per header.

Costs fall on chords only: one backend write per header task, one read per body, a
header of about 50 bytes per link (at most ``MAX_LINKS``, the SDK's default link
limit). Backends without key-value access (database, rpc) get no links: the body
stays a child of the last header, as before. A failing backend is reported once and
the chord runs on untouched.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry.trace import Link, SpanContext

from ._guard import report
from .carrier import parse_span_ref, span_ref

#: Body message header: space-separated ``<trace id>-<span id>`` of the header spans.
CHORD_LINKS_HEADER = "otel_celery_chord_headers"

#: At most this many links (the SDK's default ``OTEL_SPAN_LINK_COUNT_LIMIT``); a
#: chord with more headers links to the first ones by group index.
MAX_LINKS = 128
_FIRST_READ = 16
_DEFAULT_TTL_S = 86400

LINK_ATTRIBUTES: Mapping[str, str] = {"celery.link": "chord_header"}


@dataclass(frozen=True)
class ChordPart:
    """A header task of a chord, as its worker sees it."""

    backend: Any
    group_id: str
    # Ids a message of the body is published under: the body's frozen task id, a
    # chain body's first task's, a group body's tasks' (checked against the group id too).
    body_ids: frozenset[str]


def part_of(request: Any, backend: Any) -> ChordPart | None:
    """The chord this request is a header of, if its backend can hold our keys."""
    body = getattr(request, "chord", None)
    if not isinstance(body, Mapping):
        return None
    group_id = getattr(request, "group", None)
    if not isinstance(group_id, str) or not _key_value(backend):
        return None
    return ChordPart(backend, group_id, _entry_ids(body))


def _key_value(backend: Any) -> bool:
    # KeyValueStoreBackend (Redis, memcached, ...) implements mget; the base class's
    # raises NotImplementedError, which the read reports once.
    return callable(getattr(backend, "mget", None)) and callable(
        getattr(backend, "get_key_for_group", None)
    )


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


def _key(part: ChordPart, index: int) -> Any:
    return part.backend.get_key_for_group(part.group_id, f".otel.{index}")


def remember(part: ChordPart, index: object, context: SpanContext) -> None:
    """Store this header's span context for the body's links."""
    if not isinstance(index, int) or index < 0 or index >= MAX_LINKS:
        return
    if not context.trace_flags.sampled:
        return  # nothing recorded to link to: save the write
    value = span_ref(context)
    backend = part.backend
    try:
        key = _key(part, index)
        client = getattr(backend, "client", None)
        if client is not None and callable(getattr(client, "set", None)) and hasattr(
            backend, "expires"
        ):
            # Redis: one SET with expiry. backend.set() would also PUBLISH the value
            # and retry with the backend's policy, stalling the task if Redis is down.
            client.set(key, value, ex=int(backend.expires or _DEFAULT_TTL_S))
        else:
            backend.set(key, value)
    except Exception as exc:  # noqa: BLE001 - the chord must run on without links
        report("chord header store", exc)


def collect(part: ChordPart) -> str | None:
    """The stored header span contexts, as the body message's header value."""
    try:
        found, more = _read(part, 0, _FIRST_READ)
        if more:  # the 16th header exists: read the rest in one more round trip
            found += _read(part, _FIRST_READ, MAX_LINKS)[0]
    except Exception as exc:  # noqa: BLE001
        report("chord header read", exc)
        return None
    return " ".join(found) or None


def _read(part: ChordPart, start: int, stop: int) -> tuple[list[str], bool]:
    """Stored values for indexes [start, stop), and whether the last one was there."""
    values = part.backend.mget([_key(part, i) for i in range(start, stop)])
    found: list[str] = []
    for value in values:
        if isinstance(value, bytes):
            value = value.decode("ascii", "replace")
        if isinstance(value, str) and parse_span_ref(value) is not None:
            found.append(value)
    return found, bool(values) and values[-1] is not None


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
