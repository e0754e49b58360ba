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
