"""Whatever headers a message arrives with, the task runs, nothing is logged, and the trace is right.

Messages are published by hand (protocol 2, JSON, real Redis) with generated extra
headers: random keys and values of every JSON type and bytes, of every size, and
valid or malformed ``traceparent`` / ``tracestate`` / ``baggage`` /
``otel_celery_previous_attempt`` at the top level, in a nested ``headers`` dict (Sentry,
Datadog) and in an ``otel_context`` dict (the seed article), sampled or not, on first
attempts and retries. The expected context is what the W3C propagators extract from
the first string value of each field, in the lookup order carrier.py documents.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from opentelemetry import baggage, context, propagate, trace
from opentelemetry.trace import SpanKind

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
# How our own headers name a span: exactly 32 and 16 lowercase hex digits, neither all zero.
SPAN_REF = re.compile(r"(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}")

# -- strategies -------------------------------------------------------------------------

TRACE_ID = st.integers(1, 2**128 - 1)
SPAN_ID = st.integers(1, 2**64 - 1)
FLAGS = st.integers(0, 255)  # bit 0: sampled


def traceparent(trace: int, span: int, flags: int) -> str:
    return f"00-{trace:032x}-{span:016x}-{flags:02x}"


VALID_TP = st.builds(traceparent, TRACE_ID, SPAN_ID, FLAGS)


@st.composite
def mutated(draw: st.DrawFn, valid: st.SearchStrategy[str]) -> str:
    """A valid value with one character replaced, removed or added (usually invalid)."""
    text = draw(valid)
    at = draw(st.integers(0, len(text)))
    how = draw(st.sampled_from(["replace", "remove", "insert"]))
    char = draw(st.sampled_from("0fF-_ xg\t=,;%é\x00"))
    if how == "replace" and at < len(text):
        return text[:at] + char + text[at + 1:]
    if how == "remove" and at < len(text):
        return text[:at] + text[at + 1:]
    return text[:at] + char + text[at:]


BAD_TP = st.one_of(
    st.sampled_from([
        "", " ", "00", "garbage", "00-" + "0" * 32 + "-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-" + "0" * 16 + "-01",
        "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-junk",
        "00_0af7651916cd43dd8448eb211c80319c_b7ad6b7169203331_01",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01" + "x" * 100_000,
    ]),
    mutated(VALID_TP),
    st.text(max_size=80),
)
FUTURE_TP = st.builds(
    lambda version, tid, sid, flags, rest: f"{version:02x}-{tid:032x}-{sid:016x}-{flags:02x}{rest}",
    st.integers(1, 254), TRACE_ID, SPAN_ID, FLAGS, st.sampled_from(["", "-what-comes-next"]),
)

KEY_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12)
TS_MEMBER = st.builds(
    lambda k, v: f"{k}={v}",
    st.from_regex(r"[a-z][a-z0-9_\-*/]{0,10}", fullmatch=True),
    st.from_regex(r"[!-+\--<>-~]{1,12}", fullmatch=True),
)
VALID_TS = st.lists(TS_MEMBER, min_size=1, max_size=5).map(",".join)
BAD_TS = st.one_of(
    st.sampled_from(["", "=", ",,,", "a=1,,b", "A=upper", "k=" + "v" * 600, "k=1," * 40]),
    mutated(VALID_TS),
    st.text(max_size=60),
)
BG_MEMBER = st.builds(
    lambda k, v, prop: f"{k}={v}{prop}",
    st.from_regex(r"[A-Za-z0-9!#$&'*+.^_`|~-]{1,10}", fullmatch=True),
    st.from_regex(r"([A-Za-z0-9!#$&'()*+./:<=>?@\[\]^_`{|}~-]|%2[0-9A-F]){0,10}", fullmatch=True),
    st.sampled_from(["", ";prop", ";p=1"]),
)
VALID_BG = st.lists(BG_MEMBER, min_size=1, max_size=6).map(",".join)
BAD_BG = st.one_of(
    st.sampled_from([
        "", "=", "k", "k==", ",,", "k=v;;", "%zz=1", "k=%zz",
        ",".join(f"k{i}=v" for i in range(300)),      # more members than W3C allows
        "k=" + "v" * 9000,                            # longer than W3C allows
    ]),
    mutated(VALID_BG),
    st.text(max_size=60),
)

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40),
    st.binary(max_size=40),  # kombu's JSON carries bytes (as {"__type__": "bytes"|"base64"})
    st.integers(0, 200_000).map(lambda n: "x" * n),  # sizes, up to 200 kB in one header
)
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


def field_values(valid: st.SearchStrategy[str], bad: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    """A value for a trace field: valid (half the time), malformed, not a string at all, or bytes of a valid one."""
    kinds = [valid] * 4 + [bad, bad, ANY_VALUE, valid.map(str.encode)]
    return st.integers(0, len(kinds) - 1).flatmap(lambda kind: kinds[kind])


TP_VALUES = field_values(st.one_of(VALID_TP, FUTURE_TP), BAD_TP)
VALID_PREVIOUS = st.builds(lambda t, s: f"{t:032x}-{s:016x}", TRACE_ID, SPAN_ID)
BAD_PREVIOUS = st.one_of(
    st.sampled_from(["", "-", "x-y", "0x1f-0x2", " 1 - 2 ", "1_0-2", "f" * 40 + "-1", "1-" + "f" * 20,
                     "0-1", "1-0", "-1-2"]),
    mutated(VALID_PREVIOUS), st.text(max_size=40),
)
VALID_CHORD = st.lists(VALID_PREVIOUS, min_size=1, max_size=4).map(" ".join)
BAD_CHORD = st.one_of(
    st.lists(st.one_of(VALID_PREVIOUS, BAD_PREVIOUS), min_size=1, max_size=4).map(" ".join),
    st.sampled_from(["", " ", "  ", ",".join(["0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331"] * 2)]),
    mutated(VALID_CHORD), st.text(max_size=60),
)
FIELDS = {"traceparent": TP_VALUES, "tracestate": field_values(VALID_TS, BAD_TS),
          "baggage": field_values(VALID_BG, BAD_BG),
          PREVIOUS: field_values(VALID_PREVIOUS, BAD_PREVIOUS),
          CHORD: field_values(VALID_CHORD, BAD_CHORD)}
OURS = {*TRACE_KEYS, SENT_AT, PREVIOUS, CHORD}
RANDOM_KEYS = KEY_TEXT.filter(lambda k: k not in CELERY_KEYS and k not in OURS)


# Where other producers put a context: ours and the official instrumentation at the top
# level, Sentry and Datadog in a nested ``headers`` dict, the seed article in ``otel_context``.
PLACES = (("traceparent",), ("headers",), ("headers", "headers"), ("otel_context",),
          ("headers", "otel_context"))


@st.composite
def message_headers(draw: st.DrawFn) -> dict[str, Any]:
    """Extra top-level headers of one message: each trace field in some of the places, random keys around."""
    headers: dict[str, Any] = draw(st.dictionaries(RANDOM_KEYS, ANY_VALUE, max_size=6))
    for key, values in FIELDS.items():
        least = 0 if key == "tracestate" else 1
        for place in draw(st.lists(st.sampled_from(PLACES), unique=True, min_size=least, max_size=3)):
            target = headers
            for step in place[:-1] if place == ("traceparent",) else place:
                if not isinstance(target.get(step), dict):
                    target[step] = draw(st.dictionaries(RANDOM_KEYS, ANY_VALUE, max_size=2))
                target = target[step]
            target[key] = draw(values)
    # Now and then a container is not a dict at all.
    for container in ("headers", "otel_context"):
        if draw(st.integers(0, 9)) == 0:
            headers[container] = draw(ANY_VALUE)
    if draw(st.booleans()):
        # A retry's message: the only one whose previous-attempt header is read.
        headers["retries"] = draw(st.integers(0, 3))
    if draw(st.integers(0, 4)) == 0:
        headers[SENT_AT] = draw(st.one_of(
            st.sampled_from(["nan", "inf", "-inf", "1e309", "-1e309", "0", "", "x", "1_7e9"]),
            st.floats().map(repr), ANY_VALUE,
        ))
    return headers


# -- the oracle: where the documented lookup order finds each field ----------------------


def locate(message: Mapping[str, Any], key: str) -> tuple[str | None, str]:
    """The value carrier.py's lookup order finds for ``key`` in these message headers, and where.

    Celery makes top-level headers attributes of ``task.request``, and ``request.headers``
    is the message's ``headers`` value when it has one, else the top-level custom headers.
    """
    def text(value: Any) -> str | None:
        return value if isinstance(value, str) else None

    found = text(message.get(key))
    if found is not None:
        return found, "top level"
    custom = message.get("headers")
    if custom is None:
        custom = {k: v for k, v in message.items() if k not in CELERY_KEYS}
    if isinstance(custom, Mapping):
        found = text(custom.get(key))
        if found is not None:
            return found, "headers"
        nested = custom.get("headers")
        if isinstance(nested, Mapping):
            found = text(nested.get(key))
            if found is not None:
                return found, "headers.headers"
    seed = message.get("otel_context")
    if not isinstance(seed, Mapping):
        seed = custom.get("otel_context") if isinstance(custom, Mapping) else None
    if isinstance(seed, Mapping) and text(seed.get(key)) is not None:
        return seed[key], "otel_context"
    return None, "nowhere"


def first_string(message: Mapping[str, Any], key: str) -> str | None:
    return locate(message, key)[0]


def own_string(message: Mapping[str, Any], key: str) -> str | None:
    """Our own otel_celery_* headers are read only where we write them: top level, or request.headers."""
    value, where = locate(message, key)
    return value if where in ("top level", "headers") else None


def expected_context(message: Mapping[str, Any]) -> Any:
    flat = {key: value for key in TRACE_KEYS if (value := first_string(message, key)) is not None}
    return propagate.extract(flat)


def span_refs(value: str | None) -> list[tuple[int, int]]:
    if value is None:
        return []
    return [(int(ref[:32], 16), int(ref[33:], 16)) for ref in value.split(" ") if SPAN_REF.fullmatch(ref)]


def expected_links(message: Mapping[str, Any]) -> list[tuple[int, int]]:
    """(trace id, span id) the span links to: a retry's previous attempt, then a chord's headers."""
    previous = span_refs(own_string(message, PREVIOUS)) if message.get("retries") else []
    return previous + span_refs(own_string(message, CHORD))[:128]


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


PROPERTY = settings(
    max_examples=100, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large],
)

# -- tests ------------------------------------------------------------------------------


@PROPERTY
@given(headers=message_headers(), x=st.integers(-(2**31), 2**31), y=st.integers(-(2**31), 2**31))
def test_any_headers_run_the_task_and_give_the_documented_context(env, exporter, instrumented, headers, x, y):
    """Any extra headers: the task returns its result, our logger is silent, and the span continues exactly the context found."""
    expected = expected_context(headers)
    parent = trace.get_current_span(expected).get_span_context()
    event(f"traceparent found at {locate(headers, 'traceparent')[1]}")
    event("context: " + ("new trace" if not parent.is_valid else
                         "continued" if parent.trace_flags.sampled else "continued, not sampled"))
    event(f"baggage found at {locate(headers, 'baggage')[1]}, members: {min(len(baggage.get_all(expected)), 3)}")
    links = expected_links(headers)
    event(f"retry linked to its previous attempt: {bool(links)}")
    if parent.is_valid and not parent.trace_flags.sampled:
        # The producer decided not to sample: the task runs in that trace, unrecorded.
        with capture_our_logger() as logged:
            seen, whoami_id = run_unsampled(env, "t.whoami", (), headers)
            total, add_id = run_unsampled(env, "t.add", (x, y), headers)
            # The solo worker runs in order: once this one's span is there, the two
            # tasks above have finished all their work.
            run(env, "t.add", (0, 0), {})
        assert total == x + y
        assert logged == []
        assert seen["trace_id"] == format(parent.trace_id, "032x")
        assert seen["baggage"] == dict(baggage.get_all(expected))
        finished = exporter.get_finished_spans()
        assert one(finished, whoami_id, C) is None and one(finished, add_id, C) is None
        return
    with capture_our_logger() as logged:
        seen, span = run(env, "t.whoami", (), headers)
        total, add_span = run(env, "t.add", (x, y), headers)
    assert total == x + y
    assert logged == []
    for consumer in (span, add_span):
        assert [(link.context.trace_id, link.context.span_id) for link in consumer.links] == links
        if parent.is_valid:
            assert trace_id(consumer) == parent.trace_id and parent_id(consumer) == parent.span_id
            assert consumer.parent is not None and consumer.parent.is_remote
            assert consumer.get_span_context().trace_state == parent.trace_state
        else:
            assert consumer.parent is None
    # A valid traceparent string at the top level is the one continued, whatever else the message has.
    top = headers.get("traceparent")
    if isinstance(top, str) and top.startswith("00-") and len(top) == 55 and parent.is_valid:
        assert format(parent.trace_id, "032x") == top[3:35]
        assert format(parent_id(span), "016x") == top[36:52]
    # The task body runs inside its own CONSUMER span and sees the message's baggage.
    assert seen["trace_id"] == format(trace_id(span), "032x")
    assert seen["span_id"] == format(span_id(span), "016x")
    assert seen["baggage"] == dict(baggage.get_all(expected))
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
    queue_time = attr(span, "celery.message.queue_time")
    assert queue_time is None or queue_time >= 0


@pytest.mark.parametrize("sent_at", ["-inf", "-1e309", "nan"])
def test_a_publish_time_that_is_not_finite_gives_no_queue_time(env, exporter, instrumented, caplog, sent_at):
    """otel_celery_sent_at of inf or nan is no time: the span has no queue time and no warning is logged for it."""
    with caplog.at_level(logging.WARNING):
        _, span = run(env, "t.whoami", (), {SENT_AT: sent_at})
    assert attr(span, "celery.message.queue_time") is None
    assert [r.getMessage() for r in caplog.records if r.name.startswith("opentelemetry")] == []


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
@given(headers=message_headers())
def test_ignore_shape_property(env, exporter, ignoring, headers):
    """trace_shape="ignore", any headers: a new trace, no link, no baggage, nothing logged."""
    with capture_our_logger() as logged:
        seen, span = run(env, "t.whoami", (), headers)
    assert logged == []
    assert span.parent is None and not span.links
    assert seen["baggage"] == {} and seen["trace_id"] == format(trace_id(span), "032x")
