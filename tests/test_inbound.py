"""What arrives at the worker: header shapes of other producers, and bad headers."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from opentelemetry.trace import SpanKind

from tests.conftest import instrument, make_app, wait_for, worker
from tests.support.raw import publish_raw
from tests.support.spans import one, parent_id, trace_id

C = SpanKind.CONSUMER
TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"
TP = f"00-{TRACE}-{PARENT}-01"


@pytest.fixture(scope="module")
def env(redis_url: str) -> Iterator[SimpleNamespace]:
    instrumentor = instrument()
    app, tasks = make_app(redis_url)
    try:
        with worker(app):
            yield SimpleNamespace(app=app, t=tasks)
    finally:
        instrumentor.uninstrument()


def run_raw(env: SimpleNamespace, headers: dict) -> tuple[dict, object]:
    task_id = publish_raw(env.app, "t.whoami", headers=headers)
    seen = env.app.AsyncResult(task_id).get(timeout=20)
    span = wait_for(lambda spans: one(spans, task_id, C))
    return seen, span


@pytest.mark.parametrize("headers", [
    {"traceparent": TP},                                  # ours / the official instrumentation
    {"headers": {"traceparent": TP}},                     # a nested dict (not Sentry's or Datadog's)
    {"otel_context": {"traceparent": TP}},                # the seed article
], ids=["top-level", "nested-headers", "seed-otel_context"])
def test_other_producers_header_shapes_connect(env, exporter, headers):
    """Context written by other producers' conventions continues their trace."""
    seen, span = run_raw(env, headers)
    assert format(trace_id(span), "032x") == TRACE == seen["trace_id"]
    assert format(parent_id(span), "016x") == PARENT


@pytest.mark.parametrize("value", [
    "garbage", "", "00-" + "0" * 32 + "-" + PARENT + "-01", "ff-" + TRACE + "-" + PARENT + "-01",
    TP + "-extra-junk", 12345, ["00", TRACE], {"traceparent": TP}, None,
], ids=["garbage", "empty", "zero-trace", "bad-version", "junk-suffix", "int", "list", "dict", "none"])
def test_malformed_or_non_string_traceparent_starts_a_new_trace(env, exporter, value):
    """Invalid context: the task runs and its span is the root of a new trace."""
    seen, span = run_raw(env, {"traceparent": value, "tracestate": 7, "baggage": ["x"]})
    assert span.parent is None
    assert seen["trace_id"] == format(trace_id(span), "032x") != TRACE
    assert seen["baggage"] == {}


# -- the main process's exemplar context (inbound.exemplar_context) ---------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"traceparent": TP}, (int(TRACE, 16), int(PARENT, 16), 1)),
        ({"traceparent": f"00-{TRACE}-{PARENT}-00"}, (int(TRACE, 16), int(PARENT, 16), 0)),
        ({"headers": {"traceparent": TP}}, (int(TRACE, 16), int(PARENT, 16), 1)),
        ({"traceparent": TP.upper()}, None),  # W3C ids are lowercase hex
        ({"traceparent": f"00-{'0' * 32}-{PARENT}-01"}, None),
        ({"traceparent": f"00-{TRACE}-{'0' * 16}-01"}, None),
        ({"traceparent": f"00-{TRACE}-{PARENT}-01-extra"}, None),
        ({"traceparent": f"00-{TRACE[:-1]}_-{PARENT}-01"}, None),  # int() would take "_"
        ({"traceparent": 7}, None),
        ({}, None),
    ],
    ids=["sampled", "unsampled", "custom-headers", "uppercase", "zero-trace", "zero-span",
         "trailing", "underscore", "not-a-string", "absent"],
)
def test_exemplar_context_is_the_producers_span_or_none(headers, expected):
    """The main process's exemplar context names exactly the producer's span of a valid traceparent, and no span otherwise."""
    from opentelemetry import trace

    from otel_celery_headers.inbound import exemplar_context

    span_context = trace.get_current_span(exemplar_context(SimpleNamespace(**headers))).get_span_context()
    if expected is None:
        assert not span_context.is_valid
    else:
        assert (span_context.trace_id, span_context.span_id, int(span_context.trace_flags)) == expected
        assert span_context.is_remote


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"traceparent": TP}, (int(TRACE, 16), int(PARENT, 16), 1)),
        ({"traceparent": f"00-{TRACE}-{PARENT}-00"}, (int(TRACE, 16), int(PARENT, 16), 0)),
        ({"traceparent": f"00-{TRACE}-{PARENT}-03"}, (int(TRACE, 16), int(PARENT, 16), 1)),
        ({"traceparent": f"00-{TRACE}-{PARENT}-02"}, (int(TRACE, 16), int(PARENT, 16), 0)),
        ({"traceparent": TP.upper()}, None),
        ({"traceparent": f"00-{TRACE[:-1]}_-{PARENT}-01"}, None),
        ({"traceparent": f"00-{'0' * 32}-{PARENT}-01"}, None),
        ({"traceparent": 7}, None),
        ({}, None),
    ],
    ids=["sampled", "unsampled", "flags-03", "flags-02", "uppercase", "underscore",
         "zero-trace", "not-a-string", "absent"],
)
@pytest.mark.parametrize("marker", ["traceparent", "traceparent baggage"])
def test_exemplar_context_of_our_marked_message(headers, expected, marker):
    """A message our producer wrote (its marker names the fields) gives the same span as the
    unmarked read: the marker's fast path parses exactly as the propagator would."""
    from opentelemetry import trace

    from otel_celery_headers.carrier import CONTEXT_HEADER
    from otel_celery_headers.inbound import exemplar_context

    carrier = SimpleNamespace(**headers, **{CONTEXT_HEADER: marker})
    span_context = trace.get_current_span(exemplar_context(carrier)).get_span_context()
    if expected is None:
        assert not span_context.is_valid
    else:
        assert (span_context.trace_id, span_context.span_id, int(span_context.trace_flags)) == expected


def test_exemplar_context_reads_only_the_fields_our_marker_names():
    """A top-level traceparent our marker does not name is someone else's: no span from it."""
    from opentelemetry import trace

    from otel_celery_headers.carrier import CONTEXT_HEADER
    from otel_celery_headers.inbound import exemplar_context

    carrier = SimpleNamespace(traceparent=TP, baggage="k=v", **{CONTEXT_HEADER: "baggage"})
    assert not trace.get_current_span(exemplar_context(carrier)).get_span_context().is_valid
