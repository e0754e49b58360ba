"""The worker's own broker traffic makes no traces when a Redis client instrumentation
is active; the task body's and a real publish's Redis spans stay in the trace."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry.instrumentation.redis import RedisInstrumentor
from opentelemetry.trace import SpanKind

from otel_celery_headers import quiet
from tests.conftest import make_app, wait_for
from tests.support.prefork import prefork_worker
from tests.support.spans import by_message, span_id

POOLS = ["prefork", "threads", "solo", "gevent"]
# opentelemetry-instrumentation-redis reads the suppression key from 0.60b0 (contrib#3955);
# the release for OpenTelemetry 1.28 (celery53's 0.49b0) traces every command whatever
# the context says, and instrument() warns so instead.
IGNORED = quiet.ignoring_instrumentations()
WARNING = "suppress_broker_traffic cannot silence opentelemetry-instrumentation-redis=="


def is_redis(span: dict[str, Any]) -> bool:
    return span["attributes"].get("db.system") == "redis" or span["attributes"].get("db.system.name") == "redis"


@pytest.fixture
def redis_traced():
    """opentelemetry-instrumentation-redis in the test process too (the publishing side)."""
    RedisInstrumentor().instrument()
    yield
    RedisInstrumentor().uninstrument()


@pytest.mark.parametrize("pool", POOLS)
def test_worker_traffic_makes_no_traces(pool, redis_url, tmp_path, exporter, tracer, producer_side, redis_traced):
    """3 tasks, each one SET of its own: the worker exports no root span at all; each SET
    is a child of its task's process span, beside the result store's GET and SETEX
    PUBLISH, and no other Redis span is exported; each publish's LPUSH is a child of its
    send span."""
    with prefork_worker(redis_url, tmp_path, pool=pool, concurrency=2,
                        app_module="tests.support.quiet_app", env={"SPAN_DELAY_MS": "100"}) as w:
        app, t = make_app(redis_url, task_default_queue=w.queue)
        w.wait_ready(app)  # a remote-control round trip: pidbox traffic in the worker
        exporter.clear()
        with tracer.start_as_current_span("request"):
            sent = [t.redis_set.delay(f"quiet-{pool}-{i}").id for i in range(3)]

        def all_sets(spans: list[dict[str, Any]]) -> bool:
            return sum(1 for s in spans if is_redis(s) and s["name"] == "SET" and s["parent_id"]) == 3

        w.wait_spans(all_sets)
        w.wait_ready(app)  # the worker answers again after the tasks: more of its traffic
        w.stop()  # the main process exports what it has as it exits
        spans = w.spans()
        log = w.log()

    roots = [s for s in spans if s["parent_id"] is None]
    if IGNORED:
        # The worker's own commands are still roots (none of ours is), and it said why.
        assert log.count(WARNING) == 1, log[-3000:]
        assert roots and all(is_redis(s) for s in roots)
    else:
        assert WARNING not in log
        assert roots == [], sorted((s["name"], s["attributes"].get("db.statement", "")[:60]) for s in roots)
    process = {s["attributes"]["messaging.message.id"]: s for s in spans if s["kind"] == "CONSUMER"}
    assert sorted(process) == sorted(sent)
    sets = [s for s in spans if is_redis(s) and s["name"] == "SET" and s["parent_id"]]
    assert sorted(s["parent_id"] for s in sets) == sorted(p["span_id"] for p in process.values())
    # The rest of the worker's Redis spans: the result store, inside each task's span.
    for task_id, span in process.items():
        children = sorted(s["name"] for s in spans if is_redis(s) and s["parent_id"] == span["span_id"])
        assert children == ["GET", "SET", "SETEX PUBLISH"], (task_id, children)
    assert sum(1 for s in spans if is_redis(s) and s["parent_id"]) == 9

    ours = list(exporter.get_finished_spans())
    for task_id in sent:
        (send,) = by_message(ours, task_id, SpanKind.PRODUCER)
        pushes = [s for s in ours if s.name == "LPUSH" and s.parent is not None
                  and s.parent.span_id == span_id(send)]
        assert len(pushes) == 1
        assert process[task_id]["parent_id"] == format(span_id(send), "016x")


@pytest.mark.parametrize("pool", POOLS)
def test_option_off_brings_the_noise_back(pool, redis_url, tmp_path, exporter, tracer, producer_side, redis_traced):
    """suppress_broker_traffic=false: the worker's own Redis commands are root spans again."""
    env = {"SPAN_DELAY_MS": "100", "OTEL_PYTHON_CELERY_HEADERS_SUPPRESS_BROKER_TRAFFIC": "false"}
    with prefork_worker(redis_url, tmp_path, pool=pool, concurrency=2,
                        app_module="tests.support.quiet_app", env=env) as w:
        app, t = make_app(redis_url, task_default_queue=w.queue)
        w.wait_ready(app)
        t.redis_set.delay(f"loud-{pool}")

        def redis_roots(spans: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [s for s in spans if s["parent_id"] is None and is_redis(s)]

        # A positive count is the behaviour here: the noise is back.
        assert len(w.wait_spans(redis_roots)) > 0


def test_a_real_publish_from_quiet_code_keeps_its_transport_spans(redis_url, exporter, producer_side, redis_traced):
    """Published from inside the worker's quiet code (a retry from Request.on_failure, a
    chord callback from the main process), the transport's LPUSH is still a child of the
    send span; a user's own suppress_instrumentation() is left alone."""
    from opentelemetry import context as otel_context
    from opentelemetry.instrumentation.utils import suppress_instrumentation

    from otel_celery_headers import quiet

    app, t = make_app(redis_url, task_default_queue="quiet-publish")
    t.add.delay(0, 0)  # connects and declares the queue: the publishes below only push
    token = otel_context.attach(quiet.quieted())
    try:
        ours = t.add.delay(1, 1).id
    finally:
        otel_context.detach(token)
    with suppress_instrumentation():
        theirs = t.add.delay(2, 2).id
    spans = list(exporter.get_finished_spans())
    (send,) = by_message(spans, ours, SpanKind.PRODUCER)
    assert [s.name for s in spans if s.parent is not None and s.parent.span_id == span_id(send)] == ["LPUSH"]
    (send,) = by_message(spans, theirs, SpanKind.PRODUCER)
    # (an instrumentation that ignores suppression ignores the user's too)
    expected = ["LPUSH"] if IGNORED else []
    assert [s.name for s in spans if s.parent is not None and s.parent.span_id == span_id(send)] == expected


def test_a_publish_without_its_own_span_from_quiet_code_keeps_its_transport_spans(redis_url, exporter, tracer, redis_traced):
    """A task of no_publish_span published from the worker's quiet code: no send span, and
    the transport's LPUSH is still traced, a child of the caller's span the message carries."""
    from opentelemetry import context as otel_context

    from otel_celery_headers import quiet
    from tests.conftest import instrument

    instrumentor = instrument(no_publish_span=["t.add"])
    try:
        app, t = make_app(redis_url, task_default_queue="quiet-nospan")
        t.add.delay(0, 0)  # connects and declares the queue: the publish below only pushes
        exporter.clear()
        with tracer.start_as_current_span("retrying") as caller:
            token = otel_context.attach(quiet.quieted())
            try:
                message_id = t.add.delay(1, 1).id
            finally:
                otel_context.detach(token)
    finally:
        instrumentor.uninstrument()
    spans = list(exporter.get_finished_spans())
    assert by_message(spans, message_id, SpanKind.PRODUCER) == []
    under_caller = [s.name for s in spans
                    if s.parent is not None and s.parent.span_id == caller.get_span_context().span_id]
    # (an instrumentation that ignores suppression traces it either way)
    assert under_caller == ["LPUSH"]


def test_the_wrappers_exist_only_while_the_option_is_on():
    """On: the consumer loop and kombu's ack are wrapped, and undone by uninstrument();
    off: nothing is wrapped, so nothing is paid."""
    from celery.worker.consumer.consumer import Consumer
    from kombu.message import Message
    from wrapt import FunctionWrapper

    from tests.conftest import instrument

    def wrapped() -> list[bool]:
        return [isinstance(vars(Consumer)["start"], FunctionWrapper),
                isinstance(vars(Message)["ack"], FunctionWrapper)]

    instrumentor = instrument()
    assert wrapped() == [True, True]
    instrumentor.uninstrument()
    assert wrapped() == [False, False]
    instrumentor = instrument(suppress_broker_traffic=False)
    assert wrapped() == [False, False]
    instrumentor.uninstrument()


def test_with_the_option_off_uninstrument_leaves_others_wrappers_alone():
    """suppress_broker_traffic=False wraps nothing of kombu's, so uninstrument() unwraps
    nothing there either: another library's wrapper of Message.ack stays in place."""
    from kombu.message import Message
    from wrapt import FunctionWrapper, wrap_function_wrapper

    from opentelemetry.instrumentation.utils import unwrap
    from tests.conftest import instrument

    calls = []

    def theirs(wrapped, instance, args, kwargs):
        calls.append("theirs")
        return wrapped(*args, **kwargs)

    instrumentor = instrument(suppress_broker_traffic=False)
    wrap_function_wrapper(Message, "ack", theirs)
    try:
        instrumentor.uninstrument()
        assert isinstance(vars(Message)["ack"], FunctionWrapper)
        assert vars(Message)["ack"]._self_wrapper is theirs
    finally:
        if isinstance(vars(Message)["ack"], FunctionWrapper):
            unwrap(Message, "ack")


def test_pool_children_forked_by_the_loop_are_not_quiet(redis_url, tmp_path, exporter, producer_side):
    """max_tasks_per_child=1: billiard forks each replacement child from inside the quiet
    event loop; user code in a child outside any task (a worker_process_init receiver's
    Redis call) still makes its span, in the first child and in each replacement."""
    env = {"SPAN_DELAY_MS": "100", "CHILD_INIT_REDIS": "1"}
    with prefork_worker(redis_url, tmp_path, concurrency=1, max_tasks_per_child=1,
                        app_module="tests.support.quiet_app", env=env) as w:
        app, t = make_app(redis_url, task_default_queue=w.queue)
        w.wait_ready(app)
        for i in range(2):
            assert t.add.delay(i, i).get(timeout=60) == 2 * i
        # The third child, forked after the second task, has run its init when it answers.
        main = w.proc.pid

        def child_roots(spans: list[dict[str, Any]]) -> list[dict[str, Any]]:
            # Where the Redis instrumentation ignores suppression, the main process's
            # own commands are roots too (test_worker_traffic_makes_no_traces).
            return [s for s in spans if s["parent_id"] is None and (s["pid"] != main or not IGNORED)]

        w.wait_spans(lambda spans: len(child_roots(spans)) == 3)
        w.stop()
        spans = w.spans()
    roots = child_roots(spans)
    assert sorted(s["name"] for s in roots) == ["SET", "SET", "SET"]
    assert len({s["pid"] for s in roots}) == 3  # three children, two forked by the loop


def test_instrument_says_once_what_it_cannot_silence(caplog):
    """An installed opentelemetry-instrumentation-redis older than 0.60b0 ignores the
    suppression key: instrument() with the option on warns once, naming it; off, or with
    a release that reads the key, it says nothing."""
    from importlib import metadata

    from tests.conftest import instrument

    version = metadata.version("opentelemetry-instrumentation-redis")
    expected = [WARNING + version] if IGNORED else []

    def warnings() -> list[str]:
        return [r.getMessage().split(":")[0] for r in caplog.records
                if r.name == "otel_celery_headers.quiet"]

    with caplog.at_level("WARNING", logger="otel_celery_headers.quiet"):
        instrument().uninstrument()
        assert warnings() == expected
        caplog.clear()
        instrument(suppress_broker_traffic=False).uninstrument()
        assert warnings() == []
    assert quiet._release("0.49b0") == (0, 49) and quiet._release("0.60b0") == (0, 60)
    assert quiet._release("0.60b0") >= quiet._HONOURS_FROM["opentelemetry-instrumentation-redis"]
