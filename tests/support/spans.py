"""Selecting spans by name and attribute (never by position)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind

MESSAGE_ID = "messaging.message.id"


def by_message(spans: Iterable[ReadableSpan], task_id: str, kind: SpanKind) -> list[ReadableSpan]:
    return [
        s for s in spans
        if s.kind == kind and (s.attributes or {}).get(MESSAGE_ID) == task_id
    ]


def one(spans: Iterable[ReadableSpan], task_id: str, kind: SpanKind) -> ReadableSpan | None:
    """The single span of ``kind`` for message ``task_id``; None until it ends."""
    found = by_message(spans, task_id, kind)
    assert len(found) <= 1, f"{len(found)} {kind.name} spans for {task_id}"
    return found[0] if found else None


def named(spans: Iterable[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def trace_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.trace_id


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def attr(span: ReadableSpan, key: str) -> Any:
    return (span.attributes or {}).get(key)
