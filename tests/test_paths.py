"""Every Celery publish path carries the trace into the worker (Redis, solo and threads pools)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from celery import chain, chord, group
from opentelemetry import baggage, context, trace
from opentelemetry.trace import SpanKind, StatusCode

from tests.conftest import instrument, make_app, wait_for, worker
from tests.support.raw import publish_raw
from tests.support.spans import attr, by_message, named, one, parent_id, span_id, trace_id

P, C = SpanKind.PRODUCER, SpanKind.CONSUMER
TIMEOUT = 20


@pytest.fixture(scope="module", params=["solo", "threads"])
def env(request: pytest.FixtureRequest, redis_url: str) -> Iterator[SimpleNamespace]:
    instrumentor = instrument()
    app, tasks = make_app(redis_url)
    try:
        with worker(app, pool=request.param):
            yield SimpleNamespace(app=app, t=tasks, pool=request.param)
    finally:
        instrumentor.uninstrument()


def pair(task_id: str) -> tuple:
    """Wait for, and return, the producer and consumer spans of one message."""
    return wait_for(lambda spans: (lambda p, c: (p, c) if p and c else None)(
        one(spans, task_id, P), one(spans, task_id, C)))


def consumer(task_id: str):
    return wait_for(lambda spans: one(spans, task_id, C))


def assert_linked(root, producer, consumer_span) -> None:
    assert trace_id(producer) == trace_id(root) == trace_id(consumer_span)
    assert parent_id(consumer_span) == span_id(producer)


def test_delay_gives_one_trace_into_the_task_body(env, exporter, tracer):
    """`.delay()` under a request span: publish, process and the body's own span share one trace."""
    with tracer.start_as_current_span("request") as root:
        result = env.t.add.delay(1, 2)
    assert result.get(timeout=TIMEOUT) == 3
    producer, consumer_span = pair(result.id)
    assert_linked(root, producer, consumer_span)
    assert parent_id(producer) == span_id(root)
    assert producer.name == "send t.add" and consumer_span.name == "process t.add"
    body = wait_for(lambda spans: [s for s in named(spans, "add-body") if trace_id(s) == trace_id(root)])
    assert parent_id(body[0]) == span_id(consumer_span)
    assert attr(consumer_span, "messaging.system") == "redis"
    assert attr(consumer_span, "messaging.destination.name") == "celery"


def test_apply_async_keeps_user_headers_and_does_not_mutate_them(env, exporter, tracer):
    """The caller's headers dict is untouched, and its entries reach the task."""
    mine = {"x-tenant": "acme"}
    with tracer.start_as_current_span("request") as root:
        result = env.t.header.apply_async(("x-tenant",), headers=mine)
    assert result.get(timeout=TIMEOUT) == "acme"
    assert mine == {"x-tenant": "acme"}
    assert_linked(root, *pair(result.id))


def test_headers_none_works(env, exporter, tracer):
    """`headers=None` is accepted and still carries the context."""
    with tracer.start_as_current_span("request") as root:
        result = env.t.add.apply_async((2, 2), headers=None)
    assert result.get(timeout=TIMEOUT) == 4
    assert_linked(root, *pair(result.id))


def test_send_task_by_name_gives_exactly_one_producer_span(env, exporter, tracer):
    """`send_task` with a name the producer does not know is traced once, not twice."""
    with tracer.start_as_current_span("request") as root:
        result = env.app.send_task("t.add", args=(5, 5))
    assert result.get(timeout=TIMEOUT) == 10
    producer, consumer_span = pair(result.id)
    assert_linked(root, producer, consumer_span)
    assert len(by_message(exporter.get_finished_spans(), result.id, P)) == 1


def test_apply_async_is_one_producer_span_not_two(env, exporter, tracer):
    """apply_async calls send_task internally; only one PRODUCER span results."""
    with tracer.start_as_current_span("request"):
        result = env.t.add.apply_async((1, 1))
    result.get(timeout=TIMEOUT)
    pair(result.id)
    producers = [s for s in exporter.get_finished_spans() if s.kind == P]
    assert len(producers) == 1


def test_signature_apply_async(env, exporter, tracer):
    """A signature's apply_async and an immutable signature's delay are traced."""
    with tracer.start_as_current_span("request") as root:
        first = env.t.add.s(1, 2).apply_async()
        second = env.t.add.si(3, 4).delay()
    assert first.get(timeout=TIMEOUT) == 3 and second.get(timeout=TIMEOUT) == 7
    assert_linked(root, *pair(first.id))
    assert_linked(root, *pair(second.id))


def test_chain_every_step_in_the_callers_trace(env, exporter, tracer):
    """Each chain step is published by the previous step's worker span, in one trace."""
    with tracer.start_as_current_span("request") as root:
        result = chain(env.t.add.s(1, 2), env.t.add.s(10), env.t.add.s(100)).apply_async()
    assert result.get(timeout=TIMEOUT) == 113
    last_producer, last_consumer = pair(result.id)
    middle_id = result.parent.id
    middle_producer, middle_consumer = pair(middle_id)
    first_producer, first_consumer = pair(result.parent.parent.id)
    assert_linked(root, first_producer, first_consumer)
    assert parent_id(first_producer) == span_id(root)
    assert_linked(root, middle_producer, middle_consumer)
    assert parent_id(middle_producer) == span_id(first_consumer)
    assert_linked(root, last_producer, last_consumer)
    assert parent_id(last_producer) == span_id(middle_consumer)


def test_group_members_are_children_of_the_caller(env, exporter, tracer):
    """Each member of a group is its own publish under the caller."""
    with tracer.start_as_current_span("request") as root:
        result = group(env.t.add.s(i, i) for i in range(3)).apply_async()
    assert result.get(timeout=TIMEOUT) == [0, 2, 4]
    for child in result.results:
        producer, consumer_span = pair(child.id)
        assert_linked(root, producer, consumer_span)
        assert parent_id(producer) == span_id(root)
        assert attr(consumer_span, "celery.task.group_id") == result.id


def test_chord_header_and_body_in_one_trace(env, exporter, tracer):
    """A chord's header tasks and its body all belong to the caller's trace."""
    with tracer.start_as_current_span("request") as root:
        result = chord([env.t.add.s(i, i) for i in range(3)], env.t.collect.s()).apply_async()
    assert result.get(timeout=TIMEOUT) == 6
    body_producer, body_consumer = pair(result.id)
    assert_linked(root, body_producer, body_consumer)
    # Header spans end in task_postrun, after the result that may trigger the body:
    # with the threads pool the body can finish first, so wait for all three.
    header_consumers = wait_for(lambda spans: (lambda found: found if len(found) == 3 else None)(
        [s for s in spans if s.kind == C and s.name == "process t.add"
         and trace_id(s) == trace_id(root)]))
    # The body is sent by whichever header task finished last, from its worker span.
    assert parent_id(body_producer) in {span_id(s) for s in header_consumers}


def header_spans(root, count: int) -> list:
    """The `process t.add` spans of a chord's header tasks, once all have ended."""
    return wait_for(lambda spans: (lambda found: found if len(found) == count else None)(
        [s for s in spans if s.kind == C and s.name == "process t.add"
         and trace_id(s) == trace_id(root) and attr(s, "celery.task.group_id")
         # (a chain step inside a chord body also carries the group id, and a parent)
         and not attr(s, "celery.task.parent_id")]))


def chord_links(span) -> set[int]:
    return {link.context.span_id for link in span.links
            if (link.attributes or {}).get("celery.link") == "chord_header"}


def test_chord_body_links_to_every_header_task(env, exporter, tracer):
    """The fan-in is visible: the body's process span links to each header's process span."""
    with tracer.start_as_current_span("request") as root:
        result = chord([env.t.add.s(i, i) for i in range(5)], env.t.collect.s()).apply_async()
    assert result.get(timeout=TIMEOUT) == 20
    _, body = pair(result.id)
    headers = header_spans(root, 5)
    assert chord_links(body) == {span_id(s) for s in headers}
    assert all(link.context.trace_id == trace_id(root) for link in body.links)
    # Header tasks themselves link to nothing.
    assert all(not s.links for s in headers)


def test_chord_with_twenty_headers(env, exporter, tracer):
    """20 headers, finishing in any order: every one is linked."""
    with tracer.start_as_current_span("request") as root:
        result = chord([env.t.add.s(i, 0) for i in range(20)], env.t.collect.s()).apply_async()
    assert result.get(timeout=TIMEOUT) == sum(range(20))
    _, body = pair(result.id)
    assert chord_links(body) == {span_id(s) for s in header_spans(root, 20)}


def test_chord_of_chains_links_the_step_that_reports_to_the_chord(env, exporter, tracer):
    """Chains as headers: the body links to each chain's last step (the one that completes its part)."""
    with tracer.start_as_current_span("request") as root:
        result = chord([chain(env.t.add.s(i, i), env.t.add.s(10)) for i in range(3)],
                       env.t.collect.s()).apply_async()
    assert result.get(timeout=TIMEOUT) == 36
    _, body = pair(result.id)
    steps = wait_for(lambda spans: (lambda found: found if len(found) == 6 else None)(
        [s for s in spans if s.kind == C and s.name == "process t.add" and trace_id(s) == trace_id(root)]))
    last_steps = {span_id(s) for s in steps if attr(s, "celery.task.parent_id")}
    assert len(last_steps) == 3 and chord_links(body) == last_steps


def test_chord_chain_body_links_its_first_task(env, exporter, tracer):
    """A chain as the body: its first task is what the finishing header sends; it carries the links."""
    with tracer.start_as_current_span("request") as root:
        result = chord([env.t.add.s(i, i) for i in range(3)],
                       chain(env.t.collect.s(), env.t.add.s(100))).apply_async()
    assert result.get(timeout=TIMEOUT) == 106
    headers = {span_id(s) for s in header_spans(root, 3)}
    first = wait_for(lambda spans: [s for s in spans if s.kind == C and s.name == "process t.collect"
                                    and trace_id(s) == trace_id(root)])
    assert chord_links(first[0]) == headers
    last = consumer(result.id)  # the chain's second step links to nothing
    assert not chord_links(last)


def test_chord_group_body_links_each_body_task(env, exporter, tracer):
    """A group as the body: each of its tasks links to every header."""
    with tracer.start_as_current_span("request") as root:
        result = chord([env.t.add.s(i, i) for i in range(3)],
                       group(env.t.collect.s(), env.t.collect.s())).apply_async()
    assert result.get(timeout=TIMEOUT) == [6, 6]
    headers = {span_id(s) for s in header_spans(root, 3)}
    bodies = wait_for(lambda spans: (lambda found: found if len(found) == 2 else None)(
        [s for s in spans if s.kind == C and s.name == "process t.collect"
         and trace_id(s) == trace_id(root)]))
    assert [chord_links(s) for s in bodies] == [headers, headers]


def test_link_and_link_error_callbacks_continue_the_trace(env, exporter, tracer):
    """Success callbacks and error callbacks are published from the task's span."""
    with tracer.start_as_current_span("request") as root:
        ok = env.t.add.apply_async((1, 2), link=env.t.add.s(10))
        bad = env.t.fail.apply_async(link_error=env.t.on_error.s())
    assert ok.get(timeout=TIMEOUT) == 3
    with pytest.raises(ValueError):
        bad.get(timeout=TIMEOUT)
    ok_consumer = consumer(ok.id)
    bad_consumer = consumer(bad.id)

    def callbacks(spans):
        found = [s for s in spans if s.kind == P and s.name in ("send t.add", "send t.on_error")
                 and parent_id(s) in {span_id(ok_consumer), span_id(bad_consumer)}]
        return found if len(found) == 2 else None

    for producer in wait_for(callbacks):
        task_id = attr(producer, "messaging.message.id")
        assert_linked(root, *pair(task_id))


REASONS = {"retry_once": None, "autoretry": "first attempt fails", "retry_with_reason": "rate limited"}


@pytest.mark.parametrize("task_name", ["retry_once", "autoretry", "retry_with_reason"])
def test_retry_attempts_each_get_a_span_in_the_same_trace(env, exporter, tracer, task_name):
    """retry() and autoretry_for: one span per attempt, attempt number recorded, one trace."""
    with tracer.start_as_current_span("request") as root:
        result = getattr(env.t, task_name).delay()
    assert result.get(timeout=TIMEOUT) == 1

    def attempts(spans):
        found = by_message(spans, result.id, C)
        return sorted(found, key=lambda s: attr(s, "celery.task.retries")) if len(found) == 2 else None

    first, second = wait_for(attempts)
    assert [attr(first, "celery.task.retries"), attr(second, "celery.task.retries")] == [0, 1]
    assert trace_id(first) == trace_id(second) == trace_id(root)
    assert attr(first, "celery.task.state") == "RETRY"
    assert first.status.status_code == StatusCode.UNSET
    # celery.retry.reason: the exception the retry was for (autoretry_for passes it as
    # Retry.exc); a bare self.retry() has none, and the attribute is absent.
    assert attr(first, "celery.retry.reason") == REASONS[task_name]
    assert attr(second, "celery.retry.reason") is None
    # The second attempt's message was published from inside the first attempt:
    # its parent is that publish, not the stale context copied from the first message.
    retry_publish = [s for s in by_message(exporter.get_finished_spans(), result.id, P)
                     if parent_id(s) == span_id(first)]
    assert len(retry_publish) == 1
    assert parent_id(second) == span_id(retry_publish[0])
    # ...and it links straight to the attempt before it.
    assert [(link.context.span_id, link.attributes["celery.link"]) for link in second.links] == [
        (span_id(first), "previous_attempt")]
    assert not first.links


def test_replace_continues_the_trace(env, exporter, tracer):
    """A task that replaces itself: the replacement runs in the same trace."""
    with tracer.start_as_current_span("request") as root:
        result = env.t.replace_me.delay()
    assert result.get(timeout=TIMEOUT) == 42
    # The replacement inherits the replaced task's id, so select by name.
    replaced, replacement = wait_for(lambda spans: (lambda a, b: (a[0], b[0]) if a and b else None)(
        [s for s in by_message(spans, result.id, C) if s.name == "process t.replace_me"],
        [s for s in by_message(spans, result.id, C) if s.name == "process t.add"]))
    assert trace_id(replaced) == trace_id(replacement) == trace_id(root)
    assert attr(replaced, "celery.task.state") == "IGNORED"  # replace() raises Ignore
    publish = [s for s in by_message(exporter.get_finished_spans(), result.id, P)
               if parent_id(s) == span_id(replaced)]
    assert len(publish) == 1 and parent_id(replacement) == span_id(publish[0])


def test_task_published_inside_a_worker_continues_the_running_trace(env, exporter, tracer):
    """A task's own .delay() publishes under the task's span."""
    with tracer.start_as_current_span("request") as root:
        result = env.t.publish_child.delay()
    child_id = result.get(timeout=TIMEOUT)
    parent_consumer = consumer(result.id)
    child_producer, child_consumer = pair(child_id)
    assert parent_id(child_producer) == span_id(parent_consumer)
    assert_linked(root, child_producer, child_consumer)


def test_failure_is_an_error_span_and_the_caller_gets_its_exception(env, exporter, tracer):
    """A raising task: ERROR span with the exception; the result raises the user's ValueError."""
    with tracer.start_as_current_span("request"):
        result = env.t.fail.delay()
    with pytest.raises(ValueError, match="boom"):
        result.get(timeout=TIMEOUT)
    span = consumer(result.id)
    assert span.status.status_code == StatusCode.ERROR
    assert attr(span, "error.type") == "ValueError"
    assert any(e.name == "exception" for e in span.events)


def test_expected_exceptions_in_throws_are_not_errors(env, exporter, tracer):
    """An exception listed in Task.throws records the state but is not an ERROR."""
    result = env.t.expected.delay()
    with pytest.raises(KeyError):
        result.get(timeout=TIMEOUT)
    span = consumer(result.id)
    # Recorded (error.type names the class, as for any failure) but not an error:
    # status UNSET, no exception event.
    assert span.status.status_code == StatusCode.UNSET
    assert attr(span, "error.type") == "KeyError"
    assert attr(span, "celery.task.state") == "FAILURE"
    assert [e.name for e in span.events] == []


@pytest.mark.parametrize(("task_name", "state"), [("ignore_me", "IGNORED"), ("reject_me", "REJECTED")])
def test_ignore_and_reject_are_control_flow_not_errors(env, exporter, task_name, state):
    """Ignore and Reject end the span with their state, not as an error."""
    result = getattr(env.t, task_name).delay()
    span = consumer(result.id)
    assert attr(span, "celery.task.state") == state
    assert span.status.status_code != StatusCode.ERROR


def test_concurrent_producers_in_threads_keep_their_own_traces(env, exporter, tracer):
    """Eight threads publishing at once: each message is in its own thread's trace."""
    results: dict[int, tuple[int, str]] = {}

    def publish(n: int) -> None:
        with tracer.start_as_current_span(f"request-{n}") as root:
            results[n] = (trace_id(root), env.t.add.delay(n, n).id)

    threads = [threading.Thread(target=publish, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({tid for tid, _ in results.values()}) == 8
    for tid, task_id in results.values():
        producer, consumer_span = pair(task_id)
        assert trace_id(producer) == trace_id(consumer_span) == tid


def test_no_context_leaks_into_the_next_task(env, exporter, tracer):
    """A message with no context, run after a traced one, starts a new trace."""
    with tracer.start_as_current_span("request") as root:
        traced = env.t.whoami.delay()
    assert traced.get(timeout=TIMEOUT)["trace_id"] == format(trace_id(root), "032x")
    for _ in range(3):
        task_id = publish_raw(env.app, "t.whoami")
        seen = env.app.AsyncResult(task_id).get(timeout=TIMEOUT)
        span = consumer(task_id)
        assert span.parent is None
        assert seen["trace_id"] == format(trace_id(span), "032x") != format(trace_id(root), "032x")
        assert seen["baggage"] == {}


def test_baggage_reaches_the_task_body(env, exporter, tracer):
    """Baggage set by the caller is current in the task body."""
    token = context.attach(baggage.set_baggage("tenant", "acme"))
    try:
        with tracer.start_as_current_span("request"):
            result = env.t.whoami.delay()
    finally:
        context.detach(token)
    assert result.get(timeout=TIMEOUT)["baggage"] == {"tenant": "acme"}


def test_producer_span_ends_and_context_is_restored_after_publish(env, exporter, tracer):
    """After delay() returns, the caller's own span is current again."""
    with tracer.start_as_current_span("request") as root:
        env.t.add.delay(1, 1).get(timeout=TIMEOUT)
        assert trace.get_current_span() is root
