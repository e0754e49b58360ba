"""Whatever headers a message arrives with, the task runs, nothing is logged, and the trace is right.

Messages are published by hand (protocol 2, JSON, real Redis) with generated extra
headers: random keys and values of every JSON type and bytes, of every size, and
``traceparent`` / ``tracestate`` / ``baggage`` / ``otel_celery_previous_attempt`` /
``otel_celery_chord_headers`` / ``otel_celery_sent_at`` in the places producers put
them: the top level, a nested ``headers`` dict (where Sentry and Datadog write), an ``otel_context``
dict (the seed article). In each place the generator puts a valid value whose meaning
it knows (the ids it drew), a malformed string, a value that is not a string, or
nothing. The expected outcome follows from that construction and from the documented
precedence, written below as data (``PRECEDENCE``, ``unit_place``): the first place
that holds a string wins, valid or not, and the trace fields come from one place.
Nothing here looks a header up the way carrier.py does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from opentelemetry import baggage, context, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.trace import SpanKind, TraceState
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from tests.conftest import instrument, make_app, wait_for, worker
from tests.support.raw import publish_raw
from tests.support.reliability import capture_our_logger
from tests.support.spans import attr, one, parent_id, span_id, trace_id

C = SpanKind.CONSUMER
QUEUE = "reliability-input"
TIMEOUT = 20
# The solo worker ends the span right after storing the result, in the same thread: a
# short wait keeps a failing example (and hypothesis's shrinking of it) quick.
SPAN_TIMEOUT = 5

TRACE_KEYS = ("traceparent", "tracestate", "baggage")
# Keys Celery (or kombu) reads from the message headers itself: a random value there
# tests Celery, not the instrumentation. Every attribute of Celery's task Context is one.
CELERY_KEYS = frozenset({
    "lang", "task", "id", "shadow", "eta", "expires", "group", "group_index", "retries",
    "timelimit", "root_id", "parent_id", "argsrepr", "kwargsrepr", "origin", "ignore_result",
    "stamped_headers", "stamps", "reply_to", "correlation_id", "hostname", "delivery_info",
    "properties", "args", "kwargs", "callbacks", "errbacks", "chain", "chord", "headers",
    "compression", "content_type", "content_encoding", "priority", "is_eager", "called_directly",
    "logfile", "loglevel", "utc", "taskset", "time_limit", "soft_time_limit",
    "replaced_task_nesting", "_children", "_protected", "otel_context",
})
SENT_AT = "otel_celery_sent_at"
PREVIOUS = "otel_celery_previous_attempt"  # "<trace id>-<span id>" of the attempt that retried
CHORD = "otel_celery_chord_headers"  # space-separated "<trace id>-<span id>" of a chord's headers
OURS = {*TRACE_KEYS, SENT_AT, PREVIOUS, CHORD, "otel_celery_context", "sentry-trace",
        "x-datadog-trace-id", "x-datadog-parent-id"}

# -- the documented precedence, as data ----------------------------------------------
#
# A place is a path of keys from the message's top-level headers to the dict that holds
# the field; () is the top level. From carrier.py's docstring: task.request.<key> (the
# top level), task.request.headers[<key>] (the message's ``headers`` dict),
# task.request.headers["headers"][<key>] (Sentry, Datadog), task.request.otel_context
# (the seed article, also found inside ``headers``). Only a str counts; the first place
# holding one wins, even if it is malformed (then: a new trace).
PRECEDENCE: tuple[tuple[str, ...], ...] = (
    (), ("headers",), ("headers", "headers"), ("otel_context",), ("headers", "otel_context"),
)
# The trace fields are one unit (issue 18): the first place holding a str under any of
# them gives all three, and a field absent there is absent, wherever else it is. These
# messages carry no marker of our producer (otel_celery_context), as the official
# instrumentation's and older versions' do not. Skipped as places: the ``headers`` dicts
# that are Sentry's or Datadog's (a ``sentry-trace`` or ``x-datadog-trace-id``/
# ``-parent-id`` key, or a tracestate with a ``dd=`` member); at the top level, a field
# holding the same str as a ``headers`` dict with ``sentry-trace`` (Sentry's copy).
FOREIGN_PLACES = (("headers",), ("headers", "headers"))
FOREIGN_KEYS = ("sentry-trace", "x-datadog-trace-id", "x-datadog-parent-id")


def datadog_state(value: Any) -> bool:
    """A tracestate string with a list-member whose key is ``dd``."""
    return isinstance(value, str) and any(
        member.strip(" \t").startswith("dd=") for member in value.split(","))


def foreign(mapping: dict[str, Any]) -> bool:
    return any(key in mapping for key in FOREIGN_KEYS) or datadog_state(mapping.get("tracestate"))


def unit_place(dicts: dict[tuple[str, ...], dict[str, Any]]) -> tuple[str, ...] | None:
    """Where the message's context is read from, following the rules above."""
    for place in PRECEDENCE:
        mapping = dicts.get(place)
        if mapping is None or (place in FOREIGN_PLACES and foreign(mapping)):
            continue
        held = [name for name in TRACE_KEYS if isinstance(mapping.get(name), str)]
        sentry = dicts.get(("headers",))
        if place == () and sentry is not None and "sentry-trace" in sentry:
            held = [name for name in held if sentry.get(name) != mapping[name]]
        if held:
            return place
    return None


# Our own otel_celery_* headers are read only where we write them (carrier.own_header).
OWN_PRECEDENCE: tuple[tuple[str, ...], ...] = ((), ("headers",))
# The dicts a message may have besides its top level. ("headers", "otel_context") is
# made only when the top level has no ``otel_context`` dict: the docstring names the
# seed carrier once, and that combination would ask which of two dicts it means.
CONTAINERS: tuple[tuple[str, ...], ...] = (
    ("headers",), ("headers", "headers"), ("otel_context",), ("headers", "otel_context"),
)

# -- values whose meaning the generator knows ------------------------------------------
#
# Each strategy gives (kind, value, meaning): kind "valid" (meaning: what it encodes),
# "malformed" (a string that encodes nothing), "other" (not a string: treated as absent).

TRACE_ID = st.integers(1, 2**128 - 1)
SPAN_ID = st.integers(1, 2**64 - 1)
FLAGS = st.integers(0, 255)  # bit 0: sampled
NOT_HEX_OR_DASH = "gGx_=,;%é\x00."  # never part of a traceparent, not whitespace either


@st.composite
def valid_traceparent(draw: st.DrawFn) -> tuple[str, str, tuple[int, int, bool]]:
    tid, sid, flags = draw(TRACE_ID), draw(SPAN_ID), draw(FLAGS)
    # Version 00, or a future version (01-fe), which may carry more fields after a dash.
    version = draw(st.sampled_from([0, 0, 0, 1, 0x42, 0xFE]))
    rest = "" if version == 0 else draw(st.sampled_from(["", "-what-comes-next"]))
    return "valid", f"{version:02x}-{tid:032x}-{sid:016x}-{flags:02x}{rest}", (tid, sid, bool(flags & 1))


@st.composite
def malformed_traceparent(draw: st.DrawFn) -> tuple[str, str, None]:
    """Broken by construction: a version-00 value with a character removed or a foreign one inserted."""
    kind = draw(st.sampled_from(["fixed", "remove", "insert"]))
    if kind == "fixed":
        return "malformed", draw(st.sampled_from([
            "", " ", "00", "garbage", "00-" + "0" * 32 + "-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-" + "0" * 16 + "-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-junk",
            "00_0af7651916cd43dd8448eb211c80319c_b7ad6b7169203331_01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01" + "x" * 100_000,
        ])), None
    text = f"00-{draw(TRACE_ID):032x}-{draw(SPAN_ID):016x}-{draw(FLAGS):02x}"
    at = draw(st.integers(0, len(text) - 1))
    if kind == "remove":
        return "malformed", text[:at] + text[at + 1:], None
    return "malformed", text[:at] + draw(st.sampled_from(NOT_HEX_OR_DASH)) + text[at:], None


TS_KEY = st.from_regex(r"[a-z][a-z0-9_\-*/]{0,10}", fullmatch=True)
TS_VALUE = st.from_regex(r"[!-+\--<>-~]{1,12}", fullmatch=True)
VALID_TS = st.lists(st.tuples(TS_KEY, TS_VALUE), min_size=1, max_size=5, unique_by=lambda kv: kv[0]).map(
    lambda pairs: ("valid", ",".join(f"{k}={v}" for k, v in pairs), tuple(pairs)))
BAD_TS = st.sampled_from(["", "=", "A=upper", "a=1,b", "k=" + "v" * 600, "a=1,a=2", "k v=1"]).map(
    lambda value: ("malformed", value, None))

# No "%" or "+" (W3C baggage percent-decodes), no properties: the value is the value.
BG_KEY = st.from_regex(r"[A-Za-z0-9!#$&'*.^_`|~-]{1,10}", fullmatch=True)
BG_VALUE = st.from_regex(r"[A-Za-z0-9._~-]{1,10}", fullmatch=True)
VALID_BG = st.lists(st.tuples(BG_KEY, BG_VALUE), min_size=1, max_size=6, unique_by=lambda kv: kv[0]).map(
    lambda pairs: ("valid", ",".join(f"{k}={v}" for k, v in pairs), dict(pairs)))
BAD_BG = st.sampled_from(["", "k", ",,", "=", "=v", "k=" + "v" * 9000]).map(
    lambda value: ("malformed", value, None))

VALID_REF = st.tuples(TRACE_ID, SPAN_ID).map(lambda ids: ("valid", f"{ids[0]:032x}-{ids[1]:016x}", ids))
BAD_REF = st.sampled_from([
    "", "-", "x-y", "0x1f-0x2", "1_0-2", "f" * 40 + "-1", "1-" + "f" * 20, "0-1", "1-0",
    "0" * 32 + "-b7ad6b7169203331", "0af7651916cd43dd8448eb211c80319c-" + "0" * 16,
    "0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331",
    "0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331,0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
]).map(lambda value: ("malformed", value, None))


@st.composite
def chord_value(draw: st.DrawFn) -> tuple[str, str, tuple[tuple[int, int], ...]]:
    """Space-separated references, each valid or not: the valid ones, in order, are the links."""
    items = draw(st.lists(st.one_of(VALID_REF, VALID_REF, BAD_REF), min_size=1, max_size=4))
    links = tuple(meaning for kind, _, meaning in items if kind == "valid")
    return ("valid" if links else "malformed"), " ".join(value for _, value, _ in items), links


class SentAt:
    """A publish time relative to the moment of publishing (filled in by ``materialize``)."""

    def __init__(self, offset: float) -> None:
        self.offset = offset


SENT_PAST = st.floats(0, 365 * 86400).map(lambda ago: ("valid", SentAt(-ago), ("past", ago)))
SENT_FUTURE = st.floats(60, 365 * 86400).map(lambda ahead: ("valid", SentAt(ahead), ("future", ahead)))
BAD_SENT = st.sampled_from(["nan", "inf", "-inf", "1e309", "-1e309", "", "x", "12:00"]).map(
    lambda value: ("malformed", value, None))

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40),
    st.binary(max_size=40),  # kombu's JSON carries bytes (as {"__type__": "bytes"|"base64"})
    st.integers(0, 200_000).map(lambda n: "x" * n),  # sizes, up to 200 kB in one header
)
KEY_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12)
# Any JSON-ish value; dict keys include the trace keys, so a trace field buried under a
# random key is tried too (it must not be picked up).
ANY_VALUE = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(TRACE_KEYS), KEY_TEXT), inner, max_size=4),
    ),
    max_leaves=12,
)
NUMBERS = st.one_of(st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False, allow_infinity=False))
NOT_A_STRING = st.one_of(
    st.none(), NUMBERS, st.binary(max_size=40), st.lists(ANY_VALUE, max_size=3),
    st.dictionaries(st.one_of(st.sampled_from(TRACE_KEYS), KEY_TEXT), ANY_VALUE, max_size=3),
)
# Not a dict, and not None (Celery treats ``headers: None`` as no ``headers`` at all).
NOT_A_DICT = st.one_of(NUMBERS, st.text(max_size=40), st.binary(max_size=40), st.lists(ANY_VALUE, max_size=3))
RANDOM_KEYS = KEY_TEXT.filter(lambda k: k not in CELERY_KEYS and k not in OURS)


def slot(valid: st.SearchStrategy[Any], malformed: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """What one place holds for one field: nothing (half the time), valid, malformed, or not a string."""
    other = NOT_A_STRING.map(lambda value: ("other", value, None))
    absent = st.just(("absent", None, None))
    return st.one_of(absent, absent, absent, valid, valid, malformed, other)


FIELDS: dict[str, tuple[tuple[tuple[str, ...], ...], st.SearchStrategy[Any]]] = {
    "traceparent": (PRECEDENCE, slot(valid_traceparent(), malformed_traceparent())),
    "tracestate": (PRECEDENCE, slot(VALID_TS, BAD_TS)),
    "baggage": (PRECEDENCE, slot(VALID_BG, BAD_BG)),
    PREVIOUS: (OWN_PRECEDENCE, slot(VALID_REF, BAD_REF)),
    CHORD: (OWN_PRECEDENCE, slot(chord_value(), BAD_REF)),
    SENT_AT: (OWN_PRECEDENCE, slot(st.one_of(SENT_PAST, SENT_FUTURE), BAD_SENT)),
}


@dataclass
class Case:
    """A message's extra headers and what they mean, decided when they were built."""

    headers: dict[str, Any]
    found: dict[str, tuple[str, tuple[str, ...], Any]] = field(default_factory=dict)  # field -> (kind, place, meaning)

    def meaning(self, name: str) -> Any:
        """What the field means for the task: the meaning of the first string, or None."""
        kind, _, meaning = self.found.get(name, ("absent", (), None))
        return meaning if kind == "valid" else None

    def where(self, name: str) -> str:
        kind, place, _ = self.found.get(name, ("absent", (), None))
        return "nowhere" if kind == "absent" else f"{kind} at {'.'.join(place) or 'top level'}"

    @property
    def parent(self) -> tuple[int, int, bool] | None:
        return self.meaning("traceparent")

    @property
    def retries(self) -> int:
        return int(self.headers.get("retries", 0))

    def links(self) -> list[tuple[int, int]]:
        """A retry's previous attempt (retries > 0 only), then the chord's headers (sent
        from inside a task only)."""
        previous = self.meaning(PREVIOUS)
        chord = self.meaning(CHORD) if self.headers.get("parent_id") else None
        return ([previous] if previous and self.retries else []) + list(chord or ())

    def materialize(self, now: float) -> dict[str, Any]:
        """The headers to publish now: relative publish times become absolute."""
        def fill(mapping: dict[str, Any]) -> dict[str, Any]:
            return {k: repr(now + v.offset) if isinstance(v, SentAt) else v for k, v in mapping.items()}

        headers = fill(self.headers)
        if isinstance(headers.get("headers"), dict):
            headers["headers"] = fill(headers["headers"])
        return headers


@st.composite
def cases(draw: st.DrawFn) -> Case:
    top: dict[str, Any] = draw(st.dictionaries(RANDOM_KEYS, ANY_VALUE, max_size=6))
    dicts: dict[tuple[str, ...], dict[str, Any]] = {(): top}
    for path in CONTAINERS:
        outer = dicts.get(path[:-1])
        if outer is None or (path == ("headers", "otel_context") and ("otel_context",) in dicts):
            continue
        how = draw(st.sampled_from(["dict", "dict", "absent", "not a dict"]))
        if how == "dict":
            dicts[path] = outer[path[-1]] = draw(st.dictionaries(RANDOM_KEYS, ANY_VALUE, max_size=2))
        elif how == "not a dict":
            outer[path[-1]] = draw(NOT_A_DICT)
    case = Case(top)
    placed: dict[tuple[str, tuple[str, ...]], tuple[str, Any]] = {}
    for name, (precedence, values) in FIELDS.items():
        for place in precedence:
            if place not in dicts:
                continue
            kind, value, meaning = draw(values)
            if kind == "absent":
                continue
            dicts[place][name] = value
            placed[name, place] = (kind, meaning)
            if name not in TRACE_KEYS and name not in case.found and kind != "other":
                case.found[name] = (kind, place, meaning)  # first string in precedence order
    unit = unit_place(dicts)
    for name in TRACE_KEYS:
        kind, meaning = placed.get((name, unit), ("absent", None)) if unit is not None else ("absent", None)
        if kind in ("valid", "malformed"):
            case.found[name] = (kind, unit, meaning)
    if draw(st.booleans()):
        # A retry's message: the only one whose previous-attempt header is read.
        top["retries"] = draw(st.integers(0, 3))
    if draw(st.booleans()):
        # Sent from inside a task, as every chord body is: the only message whose
        # chord-headers header is read (one sent from outside has a root, no parent).
        top["parent_id"] = "4bf92f35-77b3-4da6-a3ce-929d0e0e4736"
    return case


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(redis_url: str) -> Iterator[SimpleNamespace]:
    app, tasks = make_app(redis_url, task_default_queue=QUEUE)
    with worker(app):
        yield SimpleNamespace(app=app, t=tasks)


@pytest.fixture
def ignoring() -> Iterator[None]:
    """Instrumented with trace_shape="ignore" (``instrumented`` from conftest is the default)."""
    instrumentor = instrument(trace_shape="ignore")
    yield
    instrumentor.uninstrument()


def run(env: SimpleNamespace, name: str, args: tuple[Any, ...], headers: dict[str, Any]) -> tuple[Any, Any]:
    """Publish by hand, return the task's result and its CONSUMER span."""
    task_id = publish_raw(env.app, name, args=args, headers=headers, queue=QUEUE)
    value = env.app.AsyncResult(task_id).get(timeout=TIMEOUT)
    span = wait_for(lambda spans: one(spans, task_id, C), timeout=SPAN_TIMEOUT)
    return value, span


def run_unsampled(env: SimpleNamespace, name: str, args: tuple[Any, ...], headers: dict[str, Any]) -> tuple[Any, str]:
    """Publish by hand a message whose context says "not sampled"; return the result and the task id."""
    task_id = publish_raw(env.app, name, args=args, headers=headers, queue=QUEUE)
    return env.app.AsyncResult(task_id).get(timeout=TIMEOUT), task_id


def assert_queue_time(case: Case, span: Any, published: float, done: float) -> None:
    """Present exactly when a valid publish time was found first; its value from how it was built."""
    waited = attr(span, "celery.message.queue_time")
    sent = case.meaning(SENT_AT)
    if sent is None:
        assert waited is None
    elif sent[0] == "future":
        assert waited == 0.0  # clock skew: clamped, never negative
    else:
        # Published at ``published - ago``, started between ``published`` and ``done``
        # (1 ms of slack for the float arithmetic on epoch seconds).
        ago = sent[1]
        assert waited is not None and ago - 1e-3 <= waited <= ago + (done - published) + 1e-3


PROPERTY = settings(
    max_examples=100, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large],
)

# -- the generator's labels, checked against the W3C propagators alone ------------------


@settings(PROPERTY, max_examples=300)
@given(tp=slot(valid_traceparent(), malformed_traceparent()), ts=slot(VALID_TS, BAD_TS),
       bg=slot(VALID_BG, BAD_BG))
def test_generated_values_mean_what_the_generator_says(tp, ts, bg):
    """Each generated value alone, through the SDK's W3C propagators (no carrier, no lookup order)."""
    kind, value, meaning = tp
    if kind in ("valid", "malformed"):
        found = trace.get_current_span(TraceContextTextMapPropagator().extract({"traceparent": value}))
        ctx = found.get_span_context()
        assert ((ctx.trace_id, ctx.span_id, ctx.trace_flags.sampled) if ctx.is_valid else None) == meaning
    kind, value, meaning = ts
    if kind in ("valid", "malformed"):
        carrier = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "tracestate": value}
        found = trace.get_current_span(TraceContextTextMapPropagator().extract(carrier))
        assert found.get_span_context().trace_state == TraceState(list(meaning or ()))
    kind, value, meaning = bg
    if kind in ("valid", "malformed"):
        assert dict(baggage.get_all(W3CBaggagePropagator().extract({"baggage": value}))) == (meaning or {})


# -- tests ------------------------------------------------------------------------------


@PROPERTY
@given(case=cases(), x=st.integers(-(2**31), 2**31), y=st.integers(-(2**31), 2**31))
def test_any_headers_run_the_task_and_give_the_documented_context(env, exporter, instrumented, case, x, y):
    """Any extra headers: the task returns its result, our logger is silent, and the span continues the context the generator placed first."""
    parent = case.parent
    expected_baggage = case.meaning("baggage") or {}
    expected_state = TraceState(list(case.meaning("tracestate") or ()))
    links = case.links()
    event(f"traceparent: {case.where('traceparent')}")
    event("context: " + ("new trace" if parent is None else "continued" if parent[2] else "continued, not sampled"))
    event(f"baggage: {case.where('baggage')}")
    event(f"publish time: {case.where(SENT_AT)}")
    event(f"links: {min(len(links), 2)}")
    if parent is not None and not parent[2]:
        # The producer decided not to sample: the task runs in that trace, unrecorded.
        with capture_our_logger() as logged:
            seen, whoami_id = run_unsampled(env, "t.whoami", (), case.materialize(time.time()))
            total, add_id = run_unsampled(env, "t.add", (x, y), case.materialize(time.time()))
            # The solo worker runs in order: once this one's span is there, the two
            # tasks above have finished all their work.
            run(env, "t.add", (0, 0), {})
        assert total == x + y
        assert logged == []
        assert seen["trace_id"] == format(parent[0], "032x")
        assert seen["baggage"] == expected_baggage
        finished = exporter.get_finished_spans()
        assert one(finished, whoami_id, C) is None and one(finished, add_id, C) is None
        return
    with capture_our_logger() as logged:
        published = time.time()
        seen, span = run(env, "t.whoami", (), case.materialize(published))
        done = time.time()
        assert_queue_time(case, span, published, done)
        published = time.time()
        total, add_span = run(env, "t.add", (x, y), case.materialize(published))
        assert_queue_time(case, add_span, published, time.time())
    assert total == x + y
    assert logged == []
    for consumer in (span, add_span):
        assert [(link.context.trace_id, link.context.span_id) for link in consumer.links] == links
        if parent is not None:
            assert (trace_id(consumer), parent_id(consumer)) == parent[:2]
            assert consumer.parent is not None and consumer.parent.is_remote
            assert consumer.get_span_context().trace_state == expected_state
        else:
            assert consumer.parent is None
    # The task body runs inside its own CONSUMER span and sees the message's baggage.
    assert seen["trace_id"] == format(trace_id(span), "032x")
    assert seen["span_id"] == format(span_id(span), "016x")
    assert seen["baggage"] == expected_baggage
    assert attr(span, "celery.task.name") == "t.whoami"


# The property above, with the examples that matter most written out.
TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.mark.parametrize("headers, continues", [
    ({"traceparent": TP, "tracestate": "=,,", "baggage": "%zz"}, True),
    ({"traceparent": TP.encode()}, False),
    ({"traceparent": "garbage", "headers": {"traceparent": TP}}, False),  # first string wins
    ({"traceparent": 5, "headers": {"traceparent": TP}}, True),
    ({"headers": "not a dict", "otel_context": {"traceparent": TP}}, True),
    ({"headers": {"headers": {"traceparent": TP}}}, True),
    ({"otel_context": ["traceparent", TP]}, False),
    ({"x-big": "x" * 500_000, "traceparent": TP}, True),
    ({SENT_AT: "-inf", "traceparent": TP}, True),
    ({SENT_AT: {"not": "a time"}}, False),
], ids=["bad-state-and-baggage", "bytes", "first-string-wins", "non-string-skipped",
        "headers-not-a-dict", "doubly-nested", "seed-not-a-dict", "500kB-header",
        "sent-at-minus-inf", "sent-at-dict"])
def test_examples(env, exporter, instrumented, headers, continues):
    """Hand-picked inputs: the task runs, nothing is logged, and the trace is continued only from a valid string."""
    with capture_our_logger() as logged:
        seen, span = run(env, "t.whoami", (), headers)
    assert logged == []
    if continues:
        assert format(trace_id(span), "032x") == "0af7651916cd43dd8448eb211c80319c" == seen["trace_id"]
        assert format(parent_id(span), "016x") == "b7ad6b7169203331"
    else:
        assert span.parent is None and seen["trace_id"] == format(trace_id(span), "032x")
    # None of these carries a usable publish time.
    assert attr(span, "celery.message.queue_time") is None


@pytest.mark.parametrize("where", ["top level", "headers"])
@pytest.mark.parametrize("offset", [-2.5, -86400.0, 0.0, 3600.0])
def test_a_valid_publish_time_gives_the_queue_time(env, exporter, instrumented, where, offset):
    """otel_celery_sent_at at the top level or in the message's headers dict: the time since then; a future one: 0."""
    published = time.time()
    sent = {SENT_AT: repr(published + offset)}
    with capture_our_logger() as logged:
        _, span = run(env, "t.whoami", (), sent if where == "top level" else {"headers": sent})
    done = time.time()
    assert logged == []
    waited = attr(span, "celery.message.queue_time")
    if offset > 0:
        assert waited == 0.0
    else:
        assert waited is not None and -offset - 1e-3 <= waited <= -offset + (done - published) + 1e-3


@pytest.mark.parametrize("sent_at", ["-inf", "-1e309", "nan", "inf", "", "soon"])
def test_a_publish_time_that_is_not_a_time_gives_no_queue_time(env, exporter, instrumented, caplog, sent_at):
    """otel_celery_sent_at that is not a finite number is no time: no queue time, and nothing is logged (by us or the SDK)."""
    with caplog.at_level(logging.DEBUG), capture_our_logger() as ours:
        _, span = run(env, "t.whoami", (), {SENT_AT: sent_at})
    assert attr(span, "celery.message.queue_time") is None
    assert [r.getMessage() for r in ours] == []
    assert [r.getMessage() for r in caplog.records
            if r.name.startswith(("opentelemetry", "otel_celery_headers"))] == []


# -- inbound trust ----------------------------------------------------------------------


@pytest.mark.parametrize("headers", [
    {"traceparent": TP, "tracestate": "vendor=secret", "baggage": "tenant=evil,role=admin"},
    {"headers": {"traceparent": TP, "baggage": "tenant=evil"}},
    {"otel_context": {"traceparent": TP, "baggage": "tenant=evil"}},
], ids=["top-level", "nested-headers", "seed-otel_context"])
def test_ignore_shape_uses_nothing_from_the_message(env, exporter, ignoring, headers):
    """trace_shape="ignore": the message's trace, trace state and baggage reach neither the span nor the task body."""
    seen, span = run(env, "t.whoami", (), headers)
    assert span.parent is None and not span.links
    assert format(trace_id(span), "032x") != TP[3:35]
    assert not span.get_span_context().trace_state
    assert seen == {"trace_id": format(trace_id(span), "032x"),
                    "span_id": format(span_id(span), "016x"), "baggage": {}}
    assert attr(span, "celery.trace_shape") == "ignore"


def test_ignore_shape_for_a_traced_publish_with_baggage(env, exporter, tracer, ignoring):
    """trace_shape="ignore" with our own producer: the caller's trace and baggage stop at the broker."""
    token = context.attach(baggage.set_baggage("tenant", "acme"))
    try:
        with tracer.start_as_current_span("request") as root:
            result = env.t.whoami.delay()
    finally:
        context.detach(token)
    seen = result.get(timeout=TIMEOUT)
    span = wait_for(lambda spans: one(spans, result.id, C))
    assert span.parent is None and not span.links and trace_id(span) != trace_id(root)
    assert seen["baggage"] == {} and seen["trace_id"] == format(trace_id(span), "032x")


@settings(PROPERTY, max_examples=20)
@given(case=cases())
def test_ignore_shape_property(env, exporter, ignoring, case):
    """trace_shape="ignore", any headers: a new trace, no link, no baggage, nothing logged."""
    with capture_our_logger() as logged:
        seen, span = run(env, "t.whoami", (), case.materialize(time.time()))
    assert logged == []
    assert span.parent is None and not span.links
    assert seen["baggage"] == {} and seen["trace_id"] == format(trace_id(span), "032x")
