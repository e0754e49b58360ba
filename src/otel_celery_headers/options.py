"""Options: ``instrument()`` keywords, with ``OTEL_PYTHON_CELERY_HEADERS_*`` fallbacks.

Read once, in ``_instrument`` (never at import: a process that sets the environment
after importing us must still be obeyed). A keyword beats its environment variable.
"""

from __future__ import annotations

import fnmatch
import importlib
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypedDict, cast

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import Span, TracerProvider

logger = logging.getLogger("otel_celery_headers")

ENV_PREFIX = "OTEL_PYTHON_CELERY_HEADERS_"

#: How a consumer span relates to the producer's context.
#: ``child``: same trace, child of the publish span (default).
#: ``link``: a new trace with a link to the publish span; baggage still carried.
#: ``ignore``: the inbound context is not trusted: new trace, no link, no baggage.
TraceShape = Literal["child", "link", "ignore"]
SHAPES: tuple[TraceShape, ...] = ("child", "link", "ignore")

PublishHook = Callable[["Span", str, Mapping[str, Any]], None]
ProcessHook = Callable[["Span", Any], None]
ShapeRule = TraceShape | Mapping[str, str] | Callable[[str], str]


class InstrumentKwargs(TypedDict, total=False):
    """Keywords accepted by ``CeleryHeadersInstrumentor().instrument()``."""

    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    exclude_tasks: Sequence[str]
    trace_shape: ShapeRule
    publish_hook: PublishHook | None
    process_hook: ProcessHook | None
    max_baggage_bytes: int
    flush_timeout_ms: int
    child_flush_interval_ms: int
    chord_links: bool
    queue_length: bool


@dataclass(frozen=True)
class Options:
    exclude_tasks: tuple[str, ...] = ()
    trace_shape: ShapeRule = "child"
    publish_hook: PublishHook | None = None
    process_hook: ProcessHook | None = None
    #: W3C baggage allows 8192 bytes in all; more is dropped member by member.
    max_baggage_bytes: int = 8192
    #: How long a pool child waits for its spans to export before it exits.
    flush_timeout_ms: int = 5000
    #: In a prefork pool child, export at most this often after tasks end, so a
    #: killed child loses no finished task's span. 0: only flush at child exit.
    child_flush_interval_ms: int = 200
    #: Chord headers store their span context in the result backend so the body's
    #: span can link to each of them (fanin.py). False: no keys written, no links.
    chord_links: bool = True
    #: A thread of the worker's main process reads celery.queue.length from the broker.
    queue_length: bool = True
    _cache: dict[str, tuple[bool, TraceShape]] = field(default_factory=dict, compare=False)

    def for_task(self, name: str) -> tuple[bool, TraceShape]:
        """(excluded, shape) for a task name; cached, the cache bounded."""
        hit = self._cache.get(name)
        if hit is not None:
            return hit
        excluded = any(fnmatch.fnmatchcase(name, glob) for glob in self.exclude_tasks)
        result = (excluded, _resolve_shape(self.trace_shape, name))
        # Names are few in practice, but send_task() accepts any string: cap the cache.
        if len(self._cache) >= 4096:
            self._cache.clear()
        self._cache[name] = result
        return result


def _resolve_shape(rule: ShapeRule, name: str) -> TraceShape:
    if isinstance(rule, str):
        value: object = rule
    elif isinstance(rule, Mapping):
        value = "child"
        for glob, shape in rule.items():
            if fnmatch.fnmatchcase(name, glob):
                value = shape
                break
    else:
        try:
            value = rule(name)
        except Exception as exc:  # noqa: BLE001 - a user callable must not break a task
            from ._guard import report

            report("trace_shape callable", exc)
            value = "child"
    for shape in SHAPES:
        if value == shape:
            return shape
    return "child"


def _import_callable(path: str) -> Callable[..., Any]:
    module_name, _, attr = path.partition(":")
    target: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"{path} is not callable")
    return cast(Callable[..., Any], target)


def _parse_shape(text: str) -> ShapeRule:
    text = text.strip()
    if "=" in text:
        rules: dict[str, str] = {}
        for item in text.split(","):
            glob, _, shape = item.partition("=")
            if glob.strip():
                rules[glob.strip()] = shape.strip().lower()
        return rules
    if ":" in text:
        return _import_callable(text)
    # Checked against SHAPES by the caller (_check_shape).
    return cast(ShapeRule, text.lower())


def _env(name: str, parse: Callable[[str], Any]) -> Any:
    """Parse ``OTEL_PYTHON_CELERY_HEADERS_<name>``; a bad value is logged and ignored.

    A typo in the environment must not stop ``opentelemetry-instrument`` from starting
    the user's program: the option keeps its default and the log says why.
    """
    raw = os.environ.get(ENV_PREFIX + name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return parse(raw)
    except Exception as exc:  # noqa: BLE001
        logger.warning("ignoring %s%s=%r: %s", ENV_PREFIX, name, raw, exc)
        return None


def _check_shape(value: ShapeRule) -> ShapeRule:
    if isinstance(value, str) and value not in SHAPES:
        raise ValueError(f"trace_shape must be one of {SHAPES}, not {value!r}")
    return value


def _check_count(value: Any) -> int:
    number = int(value)
    if number < 0:
        raise ValueError(f"must be >= 0, not {value!r}")
    return number


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _parse_bool(text: str) -> bool:
    word = text.strip().lower()
    if word in _TRUE or word in _FALSE:
        return word in _TRUE
    raise ValueError(f"expected one of {_TRUE + _FALSE}")


def _check_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be True or False, not {value!r}")
    return value


def load(kwargs: Mapping[str, Any]) -> Options:
    """Build the options from keywords, then environment, then defaults.

    A bad keyword raises ``ValueError`` (the caller wrote it); a bad environment value
    is logged and ignored (see ``_env``).
    """
    values: dict[str, Any] = {}

    exclude = kwargs.get("exclude_tasks")
    if exclude is None:
        exclude = _env("EXCLUDE_TASKS", lambda raw: raw.split(","))
    if exclude is not None:
        values["exclude_tasks"] = tuple(g.strip() for g in exclude if g and g.strip())

    shape = kwargs.get("trace_shape")
    if shape is not None:
        values["trace_shape"] = _check_shape(shape)
    elif (shape := _env("TRACE_SHAPE", lambda raw: _check_shape(_parse_shape(raw)))) is not None:
        values["trace_shape"] = shape

    for hook in ("publish_hook", "process_hook"):
        value = kwargs.get(hook)
        if value is None:
            value = _env(hook.upper(), _import_callable)
        if value is not None:
            values[hook] = value

    for number in ("max_baggage_bytes", "flush_timeout_ms", "child_flush_interval_ms"):
        value = kwargs.get(number)
        if value is not None:
            values[number] = _check_count(value)
        elif (value := _env(number.upper(), _check_count)) is not None:
            values[number] = value

    chord_links = kwargs.get("chord_links")
    if chord_links is not None:
        values["chord_links"] = _check_bool(chord_links)
    elif (chord_links := _env("CHORD_LINKS", _parse_bool)) is not None:
        values["chord_links"] = chord_links

    queue_length = kwargs.get("queue_length")
    if queue_length is not None:
        values["queue_length"] = _check_bool(queue_length)
    elif (queue_length := _env("QUEUE_LENGTH", _parse_bool)) is not None:
        values["queue_length"] = queue_length

    return Options(**values)
