"""Task arguments as span attributes, on demand: redacted, truncated, bounded (pure).

Runs wherever a span is built: the publishing process (``before_task_publish``'s
message body) and the pool child (``task_prerun``'s ``args``/``kwargs``). Off unless
``record_arguments`` names the task; never on metrics.

Layout: two attributes with fixed keys, ``celery.task.args`` and ``celery.task.kwargs``,
each one Python-literal-like string. Not one attribute per argument
(``celery.task.kwargs.<key>``): keyword names come from the user's code and callers,
and backends index every attribute key they see (a column per key, a cardinality
limit on keys), so keys taken from data are unbounded. Two fixed keys also fit
``OTEL_ATTRIBUTE_COUNT_LIMIT`` (128 by default) whatever a task takes.

Rendering never calls anything but ``repr`` on objects it does not know, and that
under a guard: a value of any type renders (bytes, a failing or huge ``repr``,
recursion, deep nesting, non-str keys). The work is bounded by the total cap: the
walk stops once the output is past it, so a list of a million items costs its first
few hundred.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from ._guard import report
from .options import GlobMatcher

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from .options import Options

ARGS: Final = "celery.task.args"
KWARGS: Final = "celery.task.kwargs"

#: Key patterns always redacted: a plain word matches as a substring of the key, a
#: pattern with ``*?[`` as a glob of the whole key; both case-insensitive, ``-`` as ``_``.
DEFAULT_REDACT: Final = ("password", "secret", "token", "authorization", "api_key", "cookie")
REDACTED: Final = "'[REDACTED]'"
#: Containers deeper than this render as ``[...]`` / ``{...}``.
MAX_DEPTH: Final = 6
#: Items of one container rendered before ``...[N more]``.
MAX_ITEMS: Final = 64
_GLOB_CHARS = frozenset("*?[")
_KEY_CHARS = 128


def truncated(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, saying how many were dropped."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...[truncated {len(text) - limit} chars]"


@dataclass(frozen=True, slots=True)
class Redaction:
    """Which mapping keys have their values replaced by ``'[REDACTED]'``."""

    words: tuple[str, ...]
    globs: tuple[str, ...]

    @classmethod
    def of(cls, patterns: Iterable[str]) -> Redaction:
        words: list[str] = []
        globs: list[str] = []
        for pattern in (*DEFAULT_REDACT, *patterns):
            normal = pattern.strip().lower().replace("-", "_")
            if normal:
                (globs if _GLOB_CHARS & set(normal) else words).append(normal)
        return cls(tuple(dict.fromkeys(words)), tuple(dict.fromkeys(globs)))

    def hides(self, key: object) -> bool:
        if isinstance(key, bytes):
            key = key.decode("utf-8", "replace")
        elif not isinstance(key, str):
            return False
        normal = key.lower().replace("-", "_")
        return any(word in normal for word in self.words) or any(
            fnmatch.fnmatchcase(normal, glob) for glob in self.globs
        )


class _Full(Exception):
    """The output passed the total cap: stop walking."""


class _Writer:
    __slots__ = ("budget", "limit", "parts", "redaction", "size", "stack")

    def __init__(self, redaction: Redaction, limit: int, budget: int) -> None:
        self.redaction = redaction
        self.limit = limit
        self.budget = budget
        self.parts: list[str] = []
        self.size = 0
        self.stack: set[int] = set()

    def put(self, text: str) -> None:
        self.parts.append(text)
        self.size += len(text)
        if self.size > self.budget:
            raise _Full

    def value(self, value: object, depth: int) -> None:
        kind = type(value)
        if type(value) is str:
            self.put(_text(value, self.limit))
        elif kind is bool or value is None or kind is float:
            self.put(repr(value))
        elif kind is int:
            self.put(_object(value, self.limit))
        elif type(value) is bytes or type(value) is bytearray:
            self.put(_bytes(value, self.limit))
        elif isinstance(value, Mapping):
            self.container(value, depth, "{", "}", mapping=True)
        elif isinstance(value, (list, tuple, set, frozenset)):
            # A tuple as a list: the JSON serializer delivers the publisher's tuples
            # as lists, and both spans of a message should show the same text.
            if isinstance(value, (list, tuple)):
                self.container(value, depth, "[", "]", mapping=False)
            else:
                self.container(value, depth, "{", "}", mapping=False)
        else:
            self.put(_object(value, self.limit))

    def container(
        self, value: Any, depth: int, opening: str, closing: str, mapping: bool
    ) -> None:
        if id(value) in self.stack:
            self.put(opening + "...recursive" + closing)
            return
        if depth >= MAX_DEPTH:
            self.put(opening + "..." + closing)
            return
        self.stack.add(id(value))
        try:
            self.put(opening)
            count = 0
            try:
                items = iter(value.items() if mapping else value)
                for item in items:
                    if count == MAX_ITEMS:
                        self.put(f", ...[{_length(value) - MAX_ITEMS} more]")
                        break
                    if count:
                        self.put(", ")
                    if mapping:
                        key, inner = item
                        self.put(_key(key) + ": ")
                        if self.redaction.hides(key):
                            self.put(REDACTED)
                        else:
                            self.value(inner, depth + 1)
                    else:
                        self.value(item, depth + 1)
                    count += 1
            except _Full:
                raise
            except Exception as exc:  # noqa: BLE001 - a container that fails to iterate
                self.put(f"...[unreadable: {type(exc).__name__}]")
            self.put(closing)
        finally:
            self.stack.discard(id(value))


def _text(value: str, limit: int) -> str:
    # Cut before repr(): a 100 MB string is not copied to be thrown away.
    if len(value) <= limit:
        return truncated(repr(value), limit)
    return f"{repr(value[:limit])}...[truncated {len(value) - limit} chars]"


def _bytes(value: bytes | bytearray, limit: int) -> str:
    text = repr(bytes(value[:limit]))
    if len(value) <= limit and len(text) <= limit:
        return text
    return f"{text[:limit]}...[truncated, {len(value)} bytes in all]"


def _length(value: Any) -> int:
    try:
        return int(len(value))
    except Exception:  # noqa: BLE001
        return MAX_ITEMS


def _key(key: object) -> str:
    # Keys are names, short in practice: cut at their own fixed length, not
    # max_argument_chars, so that a small value limit still shows which key is which.
    if type(key) is str:
        return _text(key, _KEY_CHARS)
    return _object(key, _KEY_CHARS)


def _object(value: object, limit: int) -> str:
    """``repr(value)`` cut to ``limit``, or what it is if its ``repr`` fails."""
    try:
        text = repr(value)
        if type(text) is str:
            return truncated(text, limit)
    except Exception as exc:  # noqa: BLE001 - a user type's __repr__ may raise
        # Also an int past 4300 digits: its repr() raises ValueError (CPython 3.11+).
        return f"<{_type_name(value)} object (repr failed: {type(exc).__name__})>"
    return f"<{_type_name(value)} object>"


def _type_name(value: object) -> str:
    try:
        return str(type(value).__qualname__)[:100]
    except Exception:  # noqa: BLE001
        return "?"


@dataclass(frozen=True, slots=True)
class Renderer:
    """Renders one execution's or publish's arguments within the limits."""

    redaction: Redaction
    #: Characters per value (a string, a repr) before it says ``...[truncated N chars]``.
    max_value: int
    #: Characters of both attributes together, markers included.
    max_total: int

    def attributes(self, args: object, kwargs: object) -> dict[str, str]:
        """``{celery.task.args: ..., celery.task.kwargs: ...}``; never raises, never
        more than ``max_total`` characters in all."""
        found: dict[str, str] = {}
        left = self.max_total
        for key, value in ((ARGS, args), (KWARGS, kwargs)):
            if value is None:
                continue
            text = self._render(value, left)
            found[key] = text
            left -= len(text)
        return found

    def _render(self, value: object, budget: int) -> str:
        writer = _Writer(self.redaction, self.max_value, budget)
        try:
            writer.value(value, 0)
        except _Full:
            pass
        except Exception as exc:  # noqa: BLE001 - never let rendering break a span
            return _fit(f"<unrenderable: {type(exc).__name__}>", budget)
        text = "".join(writer.parts)
        return text if len(text) <= budget else _fit(text, budget)


_CUT = "...[truncated]"


def _fit(text: str, budget: int) -> str:
    if len(text) <= budget:
        return text
    if budget <= len(_CUT):
        return ""
    return text[: budget - len(_CUT)] + _CUT


class Recorder:
    """The ``record_arguments`` decision and rendering of one instrumentation."""

    def __init__(self, options: Options) -> None:
        self._wanted = GlobMatcher(options.record_arguments)
        self._renderer = Renderer(
            Redaction.of(options.redact_arguments),
            options.max_argument_chars,
            options.max_arguments_chars,
        )

    @classmethod
    def of(cls, options: Options) -> Recorder | None:
        """None when no task is selected: the one check each publish and task pays."""
        return cls(options) if options.record_arguments else None

    def record(self, span: Span, name: str, args: object, kwargs: object) -> None:
        """Set the arguments on ``span`` if it records and ``name`` is selected."""
        try:
            if span.is_recording() and self._wanted(name):
                span.set_attributes(self._renderer.attributes(args, kwargs))
        except Exception as exc:  # noqa: BLE001 - never break the publish or the task
            report("record_arguments", exc)

    def record_body(self, span: Span, name: str, body: object) -> None:
        """The same from a message body: protocol 2's ``(args, kwargs, embed)`` tuple,
        or protocol 1's dict."""
        if isinstance(body, (tuple, list)) and len(body) >= 2:
            self.record(span, name, body[0], body[1])
        elif isinstance(body, dict):
            self.record(span, name, body.get("args"), body.get("kwargs"))
