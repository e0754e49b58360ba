"""Options: ``instrument()`` keywords, with ``OTEL_PYTHON_CELERY_HEADERS_*`` fallbacks.

Read once, in ``_instrument`` (never at import: a process that sets the environment
after importing us must still be obeyed), and checked there before anything is
wrapped or connected. A keyword beats its environment variable; a keyword given as
``None`` counts as not given.

- A keyword of the wrong type or value, or an unknown keyword, raises ``ValueError``
  naming the keyword and the value. The caller wrote it: fail at the call, not with
  spans silently missing (``exclude_tasks="celery.*"`` once excluded every task).
- A bad environment variable is logged once, naming the variable, and ignored: the
  option keeps its default. A typo in a deployment's environment must not stop
  ``opentelemetry-instrument`` from starting the user's program.

Adding an option takes three edits: a field on :class:`Options` (its default), a key
in :class:`InstrumentKwargs` (its type), and one row in :data:`OPTIONS` (a check for
the keyword and a parser for the variable, which is ``OTEL_PYTHON_CELERY_HEADERS_``
plus the keyword in upper case). Checks and parsers raise ``TypeError`` or
``ValueError`` with the reason; ``load()`` raises a ``ValueError`` naming the keyword
and the value, or logs the variable.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import importlib
import logging
import os
import reprlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypedDict

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import Span, TracerProvider

logger = logging.getLogger("otel_celery_headers")

ENV_PREFIX = "OTEL_PYTHON_CELERY_HEADERS_"

#: How a consumer span relates to the producer's context.
#: ``child``: same trace, child of the publish span (default).
#: ``link``: a new trace with a link to the publish span; baggage still carried.
#: ``ignore``: the inbound context is not trusted: new trace, no link, no baggage.
#: Case-insensitive wherever a shape is written (``"Link"`` is ``link``).
TraceShape = Literal["child", "link", "ignore"]
SHAPES: tuple[TraceShape, ...] = ("child", "link", "ignore")

PublishHook = Callable[["Span", str, Mapping[str, Any]], None]
ProcessHook = Callable[["Span", Any], None]
ShapeRule = TraceShape | Mapping[str, TraceShape] | Callable[[str], str]
#: What metrics get for celery.worker.hostname: "keep", "drop", or hostname -> str.
HostnameRule = Literal["keep", "drop"] | Callable[[str], str]


class InstrumentKwargs(TypedDict, total=False):
    """Keywords accepted by ``CeleryHeadersInstrumentor().instrument()``."""

    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    #: Globs of task names; a string is comma-separated globs, like the variable.
    exclude_tasks: str | Iterable[str]
    trace_shape: str | Mapping[str, str] | Callable[[str], str]
    publish_hook: PublishHook | None
    process_hook: ProcessHook | None
    max_baggage_bytes: int
    flush_timeout_ms: int
    child_flush_interval_ms: int
    chord_links: bool
    queue_length: bool
    #: Globs of task names whose arguments are recorded on their spans (arguments.py).
    record_arguments: str | Iterable[str]
    #: Key patterns redacted on top of arguments.DEFAULT_REDACT.
    redact_arguments: str | Iterable[str]
    max_argument_chars: int
    max_arguments_chars: int
    #: "keep", "drop", or a callable normalizing the node name on metric points.
    metrics_worker_hostname: str | Callable[[str], str]
    #: Globs of task names published without a span of their own.
    no_publish_span: str | Iterable[str]
    suppress_broker_traffic: bool


@dataclass(frozen=True)
class Options:
    exclude_tasks: tuple[str, ...] = ()
    trace_shape: ShapeRule = "child"
    publish_hook: PublishHook | None = None
    process_hook: ProcessHook | None = None
    #: W3C baggage allows 8192 bytes in all; more is dropped member by member.
    max_baggage_bytes: int = 8192
    #: How long a pool child waits for its spans to export, at exit and after tasks.
    #: 0: a pool child never flushes (lifecycle.py).
    flush_timeout_ms: int = 5000
    #: In a prefork pool child, export at most this often after tasks end, so a
    #: killed child loses no finished task's span. 0: only flush at child exit.
    child_flush_interval_ms: int = 200
    #: Chord headers store their span context in the result backend so the body's
    #: span can link to each of them (fanin.py). False: no keys written, no links.
    chord_links: bool = True
    #: A thread of the worker's main process reads celery.queue.length from the broker.
    queue_length: bool = True
    #: Task-name globs whose args/kwargs go on both spans (never on metrics). Empty: off.
    record_arguments: tuple[str, ...] = ()
    #: Mapping-key patterns whose values are redacted, beside arguments.DEFAULT_REDACT.
    redact_arguments: tuple[str, ...] = ()
    #: Characters per rendered value before it is cut (and says so).
    max_argument_chars: int = 256
    #: Characters of celery.task.args and celery.task.kwargs together, per span.
    max_arguments_chars: int = 2048
    #: celery.worker.hostname on metric points (health.py): kept, dropped, or the
    #: callable's answer. Spans always keep it.
    metrics_worker_hostname: HostnameRule = "keep"
    #: Task-name globs published without a PRODUCER span: the caller's context is
    #: injected, so the process span is the caller's child. Metrics still count them.
    no_publish_span: tuple[str, ...] = ()
    #: The worker's own broker and result-backend traffic runs with client
    #: instrumentation (redis, amqp) suppressed: no one-span traces of polling and
    #: acks (quiet.py). False: every command of it is a trace again.
    suppress_broker_traffic: bool = True
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


class GlobMatcher:
    """Whether a task name matches any of some globs; cached, the cache bounded."""

    def __init__(self, globs: tuple[str, ...]) -> None:
        self._globs = globs
        self._cache: dict[str, bool] = {}

    def __call__(self, name: str) -> bool:
        hit = self._cache.get(name)
        if hit is None:
            hit = any(fnmatch.fnmatchcase(name, glob) for glob in self._globs)
            if len(self._cache) >= 4096:  # send_task() accepts any name
                self._cache.clear()
            self._cache[name] = hit
        return hit


def _resolve_shape(rule: ShapeRule, name: str) -> TraceShape:
    # A string or a mapping was checked by load(); only a callable's answer is new.
    if isinstance(rule, str):
        return rule
    if isinstance(rule, Mapping):
        for glob, shape in rule.items():
            if fnmatch.fnmatchcase(name, glob):
                return shape
        return "child"
    from ._guard import report

    try:
        answer = rule(name)
    except Exception as exc:  # noqa: BLE001 - a user callable must not break a task
        report("trace_shape callable", exc)
        return "child"
    checked = _shape(answer)
    if checked is None:
        report(
            "trace_shape callable's answer",
            ValueError(
                f"it returned {answer!r} for task {name!r}, not one of {_SHAPE_WORDS}: "
                "using child"
            ),
        )
        return "child"
    return checked


# -- checks (keywords) and parsers (environment variables) -----------------------------

_SHAPE_WORDS = ", ".join(SHAPES)


def _shape(value: object) -> TraceShape | None:
    if isinstance(value, str):
        word = value.strip().lower()
        for shape in SHAPES:
            if word == shape:
                return shape
    return None


def _check_shape_word(value: object) -> TraceShape:
    shape = _shape(value)
    if shape is None:
        raise ValueError(f"expected one of {_SHAPE_WORDS}")
    return shape


def _check_rules(pairs: Iterable[tuple[object, object]]) -> dict[str, TraceShape]:
    """``{glob: shape}``, first match wins; every glob a non-empty string, every shape valid."""
    rules: dict[str, TraceShape] = {}
    for glob, shape in pairs:
        if not isinstance(glob, str) or not glob.strip():
            raise ValueError(f"glob {glob!r} is not a non-empty string")
        checked = _shape(shape)
        if checked is None:
            raise ValueError(f"glob {glob!r} has shape {shape!r}, not one of {_SHAPE_WORDS}")
        rules[glob.strip()] = checked
    return rules


def _check_trace_shape(value: object) -> ShapeRule:
    if isinstance(value, str):
        return _check_shape_word(value)
    if isinstance(value, Mapping):
        return _check_rules(value.items())
    if callable(value):
        return value  # its answer is checked when used (_resolve_shape)
    raise TypeError(f"expected one of {_SHAPE_WORDS}, a {{glob: shape}} mapping or a callable")


def _parse_trace_shape(text: str) -> ShapeRule:
    """``link``, ``reports.*=link,public.*=ignore`` or ``module:function``."""
    text = text.strip()
    if "=" in text:
        pairs = []
        for item in text.split(","):
            if item.strip():
                glob, equals, shape = item.partition("=")
                if not equals:
                    raise ValueError(f"{item.strip()!r} is not glob=shape")
                pairs.append((glob, shape))
        return _check_rules(pairs)
    if ":" in text:
        return _import_callable(text)
    return _check_shape_word(text)


def _parse_globs(text: str) -> tuple[str, ...]:
    # Empty items are skipped: "celery.*," is a trailing comma, not an empty glob.
    return tuple(glob.strip() for glob in text.split(",") if glob.strip())


def _check_globs(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return _parse_globs(value)
    if isinstance(value, (bytes, Mapping)) or not isinstance(value, Iterable):
        raise TypeError("expected a list of globs, or a string of comma-separated globs")
    globs = []
    for glob in value:
        if not isinstance(glob, str) or not glob.strip():
            raise ValueError(f"glob {glob!r} is not a non-empty string")
        globs.append(glob.strip())
    return tuple(globs)


def _check_hook(value: object) -> Callable[..., Any]:
    if not callable(value):
        raise TypeError("expected a callable or None")
    return value


def _import_callable(path: str) -> Callable[..., Any]:
    module_name, colon, attr = path.strip().partition(":")
    if not colon or not module_name or not attr:
        raise ValueError("expected module:function")
    target: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"{path.strip()} is not callable")
    return _check_hook(target)


def _check_hostname_rule(value: object) -> HostnameRule:
    if isinstance(value, str):
        word = value.strip().lower()
        if word == "keep":
            return "keep"
        if word == "drop":
            return "drop"
        raise ValueError("expected keep, drop, or a callable")
    if callable(value):
        return value  # its answer is checked when used (health.py)
    raise TypeError("expected keep, drop, or a callable")


def _parse_hostname_rule(text: str) -> HostnameRule:
    """``keep``, ``drop`` or ``module:function``."""
    if ":" in text:
        return _import_callable(text)
    return _check_hostname_rule(text)


def _check_count(value: object) -> int:
    # bool is an int subclass: True would silently be 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("expected an int >= 0")
    return value


def _parse_count(text: str) -> int:
    digits = text.strip()
    if not (digits.isascii() and digits.isdigit()):
        raise ValueError("expected a whole number >= 0")
    return int(digits)


def _check_bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError("expected True or False")
    return value


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _parse_bool(text: str) -> bool:
    word = text.strip().lower()
    if word in _TRUE or word in _FALSE:
        return word in _TRUE
    raise ValueError(f"expected one of {', '.join(_TRUE + _FALSE)}")


# -- the table ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Option:
    name: str
    #: The keyword's value (never None) -> the stored value; TypeError/ValueError if wrong.
    check: Callable[[Any], Any]
    #: The variable's text (never blank) -> the stored value; ValueError if wrong.
    parse: Callable[[str], Any]

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


#: Every option backed by an Options field and a variable; its default is the field's.
OPTIONS: tuple[_Option, ...] = (
    _Option("exclude_tasks", _check_globs, _parse_globs),
    _Option("trace_shape", _check_trace_shape, _parse_trace_shape),
    _Option("publish_hook", _check_hook, _import_callable),
    _Option("process_hook", _check_hook, _import_callable),
    _Option("max_baggage_bytes", _check_count, _parse_count),
    _Option("flush_timeout_ms", _check_count, _parse_count),
    _Option("child_flush_interval_ms", _check_count, _parse_count),
    _Option("chord_links", _check_bool, _parse_bool),
    _Option("queue_length", _check_bool, _parse_bool),
    _Option("record_arguments", _check_globs, _parse_globs),
    _Option("redact_arguments", _check_globs, _parse_globs),
    _Option("max_argument_chars", _check_count, _parse_count),
    _Option("max_arguments_chars", _check_count, _parse_count),
    _Option("metrics_worker_hostname", _check_hostname_rule, _parse_hostname_rule),
    _Option("no_publish_span", _check_globs, _parse_globs),
    _Option("suppress_broker_traffic", _check_bool, _parse_bool),
)

#: Providers, read by the instrumentor itself: None (the global one) or an object with
#: this method.
_PROVIDERS = {"tracer_provider": "get_tracer", "meter_provider": "get_meter"}

#: Passed by OpenTelemetry itself or by distros to every instrumentor; accepted, unused.
#: auto_instrumentation passes skip_dep_check=True, which BaseInstrumentor.instrument()
#: pops, as recent versions also pop raise_exception_on_conflict: both are accepted in
#: case a version or a distro passes them on. Distros may pass any provider.
_FRAMEWORK = frozenset(
    {"skip_dep_check", "raise_exception_on_conflict", "logger_provider", "event_logger_provider"}
)

_KNOWN = frozenset(o.name for o in OPTIONS) | frozenset(_PROVIDERS) | _FRAMEWORK

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Options)}

_short = reprlib.Repr()
_short.maxstring = _short.maxother = 80


def _keyword_error(name: str, value: object, reason: str) -> ValueError:
    return ValueError(f"otel-celery-headers: instrument({name}={_short.repr(value)}): {reason}")


def _check_names(kwargs: Mapping[str, Any]) -> None:
    for name in kwargs:
        if name not in _KNOWN:
            near = difflib.get_close_matches(name, sorted(_KNOWN), n=1)
            hint = f"; did you mean {near[0]}?" if near else ""
            raise _keyword_error(name, kwargs[name], f"unknown keyword{hint}")
    for name, method in _PROVIDERS.items():
        value = kwargs.get(name)
        if value is not None and not callable(getattr(value, method, None)):
            raise _keyword_error(name, value, f"expected None or an object with {method}()")


def _from_env(option: _Option) -> Any:
    """The variable's value, None if unset, blank or wrong (then logged, default kept)."""
    raw = os.environ.get(option.env)
    if raw is None or not raw.strip():
        return None
    try:
        return option.parse(raw)
    except Exception as exc:  # noqa: BLE001 - also ImportError etc. of module:function
        logger.warning(
            "otel-celery-headers: ignoring %s=%r (%s); %s keeps its default %r",
            option.env, raw, exc, option.name, _DEFAULTS[option.name],
        )
        return None


def load(kwargs: Mapping[str, Any]) -> Options:
    """Build the options from keywords, then environment, then defaults.

    A bad keyword raises ``ValueError`` (before the instrumentor wraps anything); a
    bad variable is logged and ignored (``_from_env``).
    """
    _check_names(kwargs)
    values: dict[str, Any] = {}
    for option in OPTIONS:
        given = kwargs.get(option.name)
        if given is not None:
            try:
                values[option.name] = option.check(given)
            except (TypeError, ValueError) as exc:
                raise _keyword_error(option.name, given, str(exc)) from None
        elif (value := _from_env(option)) is not None:
            values[option.name] = value
    return Options(**values)
