"""trace_shape() per call (carried in the message, honoured by the worker) and no_publish_span."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from celery import group
from celery.beat import Scheduler
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from kombu.exceptions import EncodeError
from opentelemetry.trace import SpanKind, StatusCode

from otel_celery_headers import TRACE_SHAPE_HEADER, options, scoped, trace_shape
from tests.conftest import make_app, wait_for, worker
from tests.support.fixtures import clean_environment, instrumented_with, our_log  # noqa: F401 - fixtures
from tests.support.spans import attr, by_message, one, parent_id, span_id, trace_id

P, C = SpanKind.PRODUCER, SpanKind.CONSUMER
SHAPE = "celery.trace_shape"


@pytest.fixture(scope="module")
def env(redis_url: str) -> Iterator[SimpleNamespace]:
    app, tasks = make_app(redis_url, task_default_queue="shape-volume")
    with worker(app, pool="threads"):
        yield SimpleNamespace(app=app, t=tasks)


# -- trace_shape(): the context manager ------------------------------------------------


def test_trace_shape_checks_its_word_nests_and_is_per_thread():
    """A wrong word raises at the with; blocks nest (innermost wins); another thread sees none."""
    with pytest.raises(ValueError) as raised:
        with trace_shape("sideways"):
            pass
    assert str(raised.value) == (
        "otel-celery-headers: trace_shape('sideways'): expected one of child, link, ignore"
    )
    assert scoped.current() is None
    seen = []
    with trace_shape(" Link "):
        assert scoped.current() == "link"
        with trace_shape("ignore"):
            assert scoped.current() == "ignore"
            thread = threading.Thread(target=lambda: seen.append(scoped.current()))
            thread.start()
            thread.join()
        assert scoped.current() == "link"
    assert scoped.current() is None and seen == [None]

    async def inner() -> str | None:
        return scoped.current()

    async def outer() -> list[str | None]:
        with trace_shape("link"):
            task = asyncio.ensure_future(inner())  # copies the context: inside the block
        with trace_shape("ignore"):
            return [await task, scoped.current()]

    assert asyncio.run(outer()) == ["link", "ignore"]


def test_retries_keep_the_shape_eager_calls_stay_in_the_caller_trace(env, exporter, tracer,
                                                                    instrumented_with):
    """A task that retries under trace_shape("link"): both attempts are link-shaped (the retry
    republishes the header). An eager apply() has no message: its span is the caller's child."""
    instrumented_with()
    with tracer.start_as_current_span("request") as request:
        with trace_shape("link"):
            result = env.t.retry_once.delay()
            eager = env.t.add.apply((1, 2))
    assert result.get(timeout=30) == 1 and eager.get() == 3
    attempts = wait_for(lambda spans: len(found := [s for s in by_message(spans, result.id, C)
                                                     if attr(s, "celery.task.state")]) == 2 and found)
    assert sorted(attr(s, "celery.task.retries") for s in attempts) == [0, 1]
    for attempt in attempts:
        assert attempt.parent is None and attr(attempt, SHAPE) == "link"
    inline = one(exporter.get_finished_spans(), eager.id, C)
    assert parent_id(inline) == span_id(request) and attr(inline, SHAPE) is None


@pytest.mark.parametrize("no_publish_span", [False, True])
def test_fan_out_of_1000_under_link(env, exporter, tracer, instrumented_with, no_publish_span):
    """group of 1,000 under trace_shape("link"), real threads worker on Redis: the caller's trace holds
    the caller's span and the 1,000 send spans (none with no_publish_span); each process span is
    the root of its own trace with one link, to its publish span (or to the caller's span)."""
    instrumented_with(**({"no_publish_span": ["t.add"]} if no_publish_span else {}))
    with tracer.start_as_current_span("request") as request:
        with trace_shape("link"):
            result = group(env.t.add.s(i, i) for i in range(1000)).delay()
    assert result.get(timeout=300) == [2 * i for i in range(1000)]
    ids = [child.id for child in result.results]
    processes = wait_for(
        lambda spans: len(found := [s for s in spans if s.kind == C and s.name == "process t.add"
                                     and attr(s, "messaging.message.id") in set(ids)]) == 1000
        and found,
        timeout=120,
    )
    spans = exporter.get_finished_spans()
    in_caller_trace = Counter(s.name for s in spans if trace_id(s) == trace_id(request))
    sends = {} if no_publish_span else {"send t.add": 1000}
    assert in_caller_trace == Counter({"request": 1, **sends})
    publish_of = {attr(s, "messaging.message.id"): s for s in spans if s.kind == P}
    assert len(publish_of) == (0 if no_publish_span else 1000)
    assert len({trace_id(p) for p in processes}) == 1000
    for process in processes:
        assert process.parent is None and attr(process, SHAPE) == "link"
        target = request if no_publish_span else publish_of[attr(process, "messaging.message.id")]
        assert [link.context.span_id for link in process.links] == [span_id(target)]


def test_the_header_beats_the_task_option_but_not_ignore(env, exporter, tracer, instrumented_with):
    """trace_shape("child") under a per-task link rule gives a child; a task the worker ignores stays
    ignored whatever the header says; outside the block the rule holds."""
    instrumented_with(trace_shape={"t.add": "link", "t.whoami": "ignore"})
    with tracer.start_as_current_span("request") as request:
        with trace_shape("child"):
            as_child = env.t.add.delay(1, 1)
            ignored = env.t.whoami.delay()
        by_rule = env.t.add.delay(2, 2)
    assert (as_child.get(timeout=20), by_rule.get(timeout=20)) == (2, 4)
    ignored.get(timeout=20)
    spans = wait_for(lambda spans: all(one(spans, r.id, C) for r in (as_child, ignored, by_rule))
                     and spans)
    child, lonely, linked = (one(spans, r.id, C) for r in (as_child, ignored, by_rule))
    assert parent_id(child) == span_id(one(spans, as_child.id, P)) and attr(child, SHAPE) is None
    assert trace_id(child) == trace_id(request)
    assert lonely.parent is None and lonely.links == () and attr(lonely, SHAPE) == "ignore"
    assert linked.parent is None and attr(linked, SHAPE) == "link"
    assert [link.context.span_id for link in linked.links] == [span_id(one(spans, by_rule.id, P))]


def test_a_span_of_the_main_process_takes_the_calls_shape(env, exporter, tracer, instrumented_with):
    """An expired task published under trace_shape("link"): the span the worker's main
    process emits for it (no pool ever runs it) is a new trace linked to its publish
    span, and says celery.trace_shape "link", as a span of a task that ran does."""
    from datetime import datetime, timedelta, timezone

    instrumented_with()
    with tracer.start_as_current_span("request") as request:
        with trace_shape("link"):
            expired = env.t.add.apply_async(
                (1, 1), expires=datetime.now(timezone.utc) - timedelta(seconds=30))
    span = wait_for(lambda spans: one(spans, expired.id, C))
    assert attr(span, "celery.task.state") == "REVOKED"
    assert span.parent is None and trace_id(span) != trace_id(request)
    assert attr(span, SHAPE) == "link"
    assert [link.context.span_id for link in span.links] == [
        span_id(one(exporter.get_finished_spans(), expired.id, P))]


def test_a_bad_header_keeps_the_rule_and_is_logged_once(env, exporter, instrumented_with, our_log):
    """apply_async(headers={TRACE_SHAPE_HEADER: "sideways"}): the worker uses its own rule."""
    instrumented_with()
    results = [env.t.add.apply_async((1, 2), headers={TRACE_SHAPE_HEADER: "sideways"})
               for _ in range(2)]
    assert [r.get(timeout=20) for r in results] == [3, 3]
    for result in results:
        span = wait_for(lambda spans, r=result: one(spans, r.id, C))
        assert parent_id(span) == span_id(one(exporter.get_finished_spans(), result.id, P))
    assert [r.getMessage() for r in our_log()] == [
        "otel-celery-headers: error in trace shape header ignored "
        "(the task is unaffected; further errors of this kind are not logged)"
    ]


def test_beat_entry_headers_choose_the_shape(env, exporter, instrumented_with):
    """A beat entry with options={"headers": {TRACE_SHAPE_HEADER: "link"}}: its task's span is a new
    trace linked to the entry's publish span."""
    instrumented_with()
    env.app.conf.beat_schedule = {"nightly": {
        "task": "t.add", "schedule": 1.0, "args": (3, 3),
        "options": {"headers": {TRACE_SHAPE_HEADER: "link"}},
    }}
    scheduler = Scheduler(env.app, lazy=True)
    scheduler.setup_schedule()
    result = scheduler.apply_async(scheduler.schedule["nightly"])
    assert result.get(timeout=20) == 6
    span = wait_for(lambda spans: one(spans, result.id, C))
    publish = one(exporter.get_finished_spans(), result.id, P)
    assert attr(publish, "celery.beat.entry") == "nightly"
    assert span.parent is None and trace_id(span) != trace_id(publish)
    assert [link.context.span_id for link in span.links] == [span_id(publish)]
    assert attr(span, SHAPE) == "link"


# -- no_publish_span -----------------------------------------------------------------


def test_no_publish_span_process_is_the_callers_child_and_still_counted(env, exporter, tracer,
                                                                       instrumented_with):
    """Selected tasks: no send span and no publish_hook call, the process span's parent is the
    caller's span and carries the recorded arguments, the publish is still counted and timed;
    other tasks keep their send span."""
    reader = InMemoryMetricReader()
    hooked = []
    instrumented_with(
        no_publish_span="t.add", record_arguments="t.add",
        publish_hook=lambda span, name, headers: hooked.append(name),
        meter_provider=MeterProvider(metric_readers=[reader]),
    )
    with tracer.start_as_current_span("request") as request:
        quiet = env.t.add.delay(4, 4)
        loud = env.t.whoami.delay()
    assert quiet.get(timeout=20) == 8
    loud.get(timeout=20)
    spans = wait_for(lambda spans: one(spans, quiet.id, C) and one(spans, loud.id, C) and spans)
    assert by_message(spans, quiet.id, P) == []
    assert [s for s in spans if s.name == "send t.add"] == []
    process = one(spans, quiet.id, C)
    assert parent_id(process) == span_id(request)
    assert attr(process, "celery.task.args") == "[4, 4]"
    assert parent_id(one(spans, loud.id, C)) == span_id(one(spans, loud.id, P))
    assert hooked == ["t.whoami"]
    points = {
        (metric.name, point.attributes["celery.task.name"]):
            point.value if metric.name.endswith("messages") else point.count
        for resource in reader.get_metrics_data().resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name in ("messaging.client.sent.messages", "messaging.client.operation.duration")
        for point in metric.data.data_points
    }
    assert points == {
        ("messaging.client.sent.messages", "t.add"): 1,
        ("messaging.client.sent.messages", "t.whoami"): 1,
        ("messaging.client.operation.duration", "t.add"): 1,
        ("messaging.client.operation.duration", "t.whoami"): 1,
    }


def test_no_publish_span_failed_publish_still_gets_an_error_span(env, exporter, instrumented_with):
    """A publish that fails (an argument JSON cannot encode) gets its send span, marked ERROR."""
    instrumented_with(no_publish_span="t.add")
    with pytest.raises(EncodeError):
        env.t.add.delay(object(), 1)
    failed = [s for s in exporter.get_finished_spans() if s.name == "send t.add"]
    assert [(s.status.status_code, s.kind) for s in failed] == [(StatusCode.ERROR, P)]


def test_no_publish_span_option_values(monkeypatch):
    """Globs like exclude_tasks, from a keyword or the variable; a wrong value raises naming it."""
    assert options.load({}).no_publish_span == ()
    assert options.load({"no_publish_span": "fanout.*, t.add"}).no_publish_span == ("fanout.*", "t.add")
    monkeypatch.setenv("OTEL_PYTHON_CELERY_HEADERS_NO_PUBLISH_SPAN", "fanout.*")
    assert options.load({}).no_publish_span == ("fanout.*",)
    with pytest.raises(ValueError) as raised:
        options.load({"no_publish_span": 3})
    assert str(raised.value) == (
        "otel-celery-headers: instrument(no_publish_span=3): "
        "expected a list of globs, or a string of comma-separated globs"
    )
