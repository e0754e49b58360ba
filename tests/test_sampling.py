"""Sampling: what a sampler sees at span start, an unsampled message, and recorded spans kept whole.

Issue 12: a span that will not record must cost little more than propagation, so only
the attributes a sampling rule keys on are given at span start and the rest is set
when the span records. These tests pin what that must not change.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import pytest
from celery import signals
from opentelemetry import baggage, context
from opentelemetry.context import Context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    SamplingResult,
)
from opentelemetry.trace import Link, SpanKind
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes

from tests.conftest import instrument, make_app, wait_for, worker
from tests.support.spans import one

TIMEOUT = 20
START_ATTRIBUTES = {
    "messaging.system",
    "messaging.operation.type",
    "messaging.destination.name",
    "celery.task.name",
}


class RecordingSampler(Sampler):
    """Samples the spans ``keep`` accepts (all by default), whatever their parent says;
    keeps (span name, attributes) of every decision it was asked for."""

    def __init__(self, keep: Any = None) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._keep = keep or (lambda name: True)

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        with self._lock:
            self.seen.append((name, dict(attributes or {})))
        if not self._keep(name):
            return ALWAYS_OFF.should_sample(
                parent_context, trace_id, name, kind, attributes, links, trace_state
            )
        return ALWAYS_ON.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return "RecordingSampler"

    def asked_for(self, name: str) -> list[dict[str, Any]]:
        with self._lock:
            return [attributes for seen_name, attributes in self.seen if seen_name == name]


def _provider(sampler: Sampler) -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


@pytest.fixture(scope="module")
def env(redis_url: str) -> Iterator[SimpleNamespace]:
    """A solo worker on Redis; each test instruments with its own TracerProvider."""
    app, tasks = make_app(redis_url)
    with worker(app, pool="solo") as controller:
        yield SimpleNamespace(app=app, t=tasks, hostname=controller.hostname)


def _instrumented(env: SimpleNamespace, sampler: Sampler) -> Any:
    provider, exporter = _provider(sampler)
    instrumentor = instrument(tracer_provider=provider)
    return instrumentor, provider, exporter


EXPECTED_START = {
    "messaging.system": "redis",
    "messaging.destination.name": "celery",
    "celery.task.name": "t.add",
}


def test_outside_a_sampled_trace_a_sampler_sees_exactly_the_start_attributes(env):
    """No sampled parent: both spans start with system, operation type, queue and task
    name only; a span the sampler keeps anyway gets every other attribute after."""
    # Drops the publish, keeps the process span: its parent is then unsampled.
    sampler = RecordingSampler(keep=lambda name: name.startswith("process "))
    instrumentor, provider, exporter = _instrumented(env, sampler)
    try:
        result = env.t.add.delay(1, 2)  # no span current: a root publish
        assert result.get(timeout=TIMEOUT) == 3
        process = wait_for(lambda _: one(exporter.get_finished_spans(), result.id, SpanKind.CONSUMER))
    finally:
        instrumentor.uninstrument()
    assert sampler.asked_for("send t.add") == [{**EXPECTED_START, "messaging.operation.type": "send"}]
    assert sampler.asked_for("process t.add") == [
        {**EXPECTED_START, "messaging.operation.type": "process"}
    ]
    assert set(sampler.asked_for("send t.add")[0]) == START_ATTRIBUTES
    assert one(exporter.get_finished_spans(), result.id, SpanKind.PRODUCER) is None
    # Recorded: the attributes set after the start are there.
    assert process.attributes["messaging.message.id"] == result.id
    assert process.attributes["messaging.operation.name"] == "process"
    assert process.attributes["celery.message.queue_time"] >= 0


def test_inside_a_sampled_trace_a_sampler_sees_at_least_the_start_attributes(env):
    """Under a sampled parent every attribute is given at start, the four among them."""
    sampler = RecordingSampler()
    instrumentor, provider, exporter = _instrumented(env, sampler)
    try:
        with provider.get_tracer("tests").start_as_current_span("request"):
            result = env.t.add.delay(1, 2)
        assert result.get(timeout=TIMEOUT) == 3
        # The process span ends after the result is stored: wait for it.
        wait_for(lambda _: one(exporter.get_finished_spans(), result.id, SpanKind.CONSUMER))
    finally:
        instrumentor.uninstrument()
    (send,) = sampler.asked_for("send t.add")
    (process,) = sampler.asked_for("process t.add")
    assert {k: send[k] for k in START_ATTRIBUTES} == {**EXPECTED_START, "messaging.operation.type": "send"}
    assert {k: process[k] for k in START_ATTRIBUTES} == {
        **EXPECTED_START, "messaging.operation.type": "process"
    }
    assert send["messaging.message.id"] == process["messaging.message.id"] == result.id


def test_an_unsampled_message_still_carries_the_context_and_baggage_into_the_task(env):
    """ParentBased(ALWAYS_OFF): no span is recorded, the task runs and sees the caller's trace."""
    instrumentor, provider, exporter = _instrumented(env, ParentBased(ALWAYS_OFF))
    try:
        token = context.attach(baggage.set_baggage("tenant", "acme"))
        try:
            with provider.get_tracer("tests").start_as_current_span("request") as root:
                result = env.t.whoami.delay()
                header = env.t.header.delay("traceparent")
        finally:
            context.detach(token)
        seen = result.get(timeout=TIMEOUT)
        traceparent = header.get(timeout=TIMEOUT)
    finally:
        instrumentor.uninstrument()
    caller = root.get_span_context()
    assert not root.is_recording() and caller.is_valid
    assert seen["trace_id"] == format(caller.trace_id, "032x")
    # The task body runs under the worker's (non-recording) span, not the caller's.
    assert seen["span_id"] not in ("0" * 16, format(caller.span_id, "016x"))
    assert seen["baggage"] == {"tenant": "acme"}
    version, trace_hex, _span_hex, flags = traceparent.split("-")
    assert (version, trace_hex) == ("00", format(caller.trace_id, "032x"))
    assert int(flags, 16) & 0x01 == 0  # not sampled
    assert exporter.get_finished_spans() == ()


def _attributes_of(exporter: InMemorySpanExporter, task_id: str) -> tuple[dict, dict]:
    def both(_: object) -> tuple[Any, Any] | None:
        spans = exporter.get_finished_spans()
        producer = one(spans, task_id, SpanKind.PRODUCER)
        consumer = one(spans, task_id, SpanKind.CONSUMER)
        return (producer, consumer) if producer and consumer else None

    producer, consumer = wait_for(both)
    return dict(producer.attributes), dict(consumer.attributes)


def test_a_recorded_span_keeps_every_attribute(env):
    """Sampled, the spans of a task and of the child it publishes carry the full attribute set."""
    instrumentor, provider, exporter = _instrumented(env, ALWAYS_ON)
    try:
        with provider.get_tracer("tests").start_as_current_span("request"):
            parent = env.t.publish_child.delay()
        child_id = parent.get(timeout=TIMEOUT)
        parent_send, parent_process = _attributes_of(exporter, parent.id)
        child_send, child_process = _attributes_of(exporter, child_id)
    finally:
        instrumentor.uninstrument()

    def common(task_id: str, name: str, root_id: str) -> dict[str, Any]:
        return {
            "messaging.system": "redis",
            "messaging.destination.name": "celery",
            "messaging.message.id": task_id,
            "messaging.message.conversation_id": root_id,
            "celery.task.name": name,
            "celery.task.retries": 0,
        }

    send = {"messaging.operation.type": "send", "messaging.operation.name": "send"}
    process = {"messaging.operation.type": "process", "messaging.operation.name": "process",
               "celery.task.state": "SUCCESS"}
    assert parent_send == {**common(parent.id, "t.publish_child", parent.id), **send}
    assert child_send == {
        **common(child_id, "t.add", parent.id), **send, "celery.task.parent_id": parent.id,
    }
    for attributes in (parent_process, child_process):
        hostname = attributes.pop("celery.worker.hostname")
        queue_time = attributes.pop("celery.message.queue_time")
        # The request's hostname: the node name, or its host part (what start_worker gives).
        assert hostname in (env.hostname, env.hostname.partition("@")[2])
        assert isinstance(queue_time, float) and 0 <= queue_time < TIMEOUT
    assert parent_process == {**common(parent.id, "t.publish_child", parent.id), **process}
    assert child_process == {
        **common(child_id, "t.add", parent.id), **process, "celery.task.parent_id": parent.id,
    }


# -- where a publish's transport spans go, by how the publish span was sampled ----------


class _Transport:
    """A span started while the message is handed to the broker, as a redis or amqp
    instrumentation starts one: ``after_task_publish`` runs inside the publish, after
    the message went out, under whatever context the publish made current."""

    def __init__(self, provider: TracerProvider) -> None:
        self._tracer = provider.get_tracer("tests.transport")

    def __enter__(self) -> _Transport:
        signals.after_task_publish.connect(self._sent, weak=False, dispatch_uid=id(self))
        return self

    def __exit__(self, *_: object) -> None:
        signals.after_task_publish.disconnect(dispatch_uid=id(self))

    def _sent(self, **_: Any) -> None:
        self._tracer.start_span("transport").end()


def _transport_spans(exporter: InMemorySpanExporter) -> list[Any]:
    return [s for s in exporter.get_finished_spans() if s.name == "transport"]


def test_transport_spans_nest_under_a_recorded_publish(env):
    instrumentor, provider, exporter = _instrumented(env, ALWAYS_ON)
    try:
        with _Transport(provider), provider.get_tracer("tests").start_as_current_span("request"):
            result = env.t.add.delay(1, 2)
        assert result.get(timeout=TIMEOUT) == 3
        send = wait_for(lambda _: one(exporter.get_finished_spans(), result.id, SpanKind.PRODUCER))
    finally:
        instrumentor.uninstrument()
    (transport,) = _transport_spans(exporter)
    assert transport.parent.span_id == send.context.span_id


def test_under_a_caller_an_unrecorded_publish_leaves_transport_spans_to_the_caller(env):
    """A sampler drops the publish span but keeps the caller's: the transport span is
    the caller's child, not the child of a span nobody recorded."""
    sampler = RecordingSampler(keep=lambda name: not name.startswith("send "))
    instrumentor, provider, exporter = _instrumented(env, sampler)
    try:
        with _Transport(provider), provider.get_tracer("tests").start_as_current_span("request") as caller:
            result = env.t.add.delay(1, 2)
        assert result.get(timeout=TIMEOUT) == 3
        process = wait_for(lambda _: one(exporter.get_finished_spans(), result.id, SpanKind.CONSUMER))
    finally:
        instrumentor.uninstrument()
    assert one(exporter.get_finished_spans(), result.id, SpanKind.PRODUCER) is None
    (transport,) = _transport_spans(exporter)
    assert transport.parent.span_id == caller.get_span_context().span_id
    # The message still names the publish span (unrecorded) as the task's parent.
    assert process.context.trace_id == caller.get_span_context().trace_id
    assert process.parent.span_id != caller.get_span_context().span_id


def test_without_a_caller_an_unsampled_publish_keeps_its_transport_spans_unsampled(env):
    """A root publish the sampler drops: its transport spans follow it, instead of each
    starting a trace of its own that the root sampler would keep."""
    sampler = ParentBased(RecordingSampler(keep=lambda name: not name.startswith("send ")))
    instrumentor, provider, exporter = _instrumented(env, sampler)
    try:
        with _Transport(provider):
            result = env.t.add.delay(1, 2)  # no span current: a root publish
        assert result.get(timeout=TIMEOUT) == 3
        # The fence: the solo worker has finished the task once its result is read;
        # the transport span ended inside delay(), before that.
    finally:
        instrumentor.uninstrument()
    assert _transport_spans(exporter) == []
    assert exporter.get_finished_spans() == ()


@pytest.mark.parametrize("which", ["none", "empty", "invalid", "unsampled", "sampled", "not a span"])
def test_the_parent_hint_agrees_with_the_public_api(which):
    """attributes.parent_sampled reads the API's private span key to skip an ABC check:
    it must give what get_current_span() does, so an API change shows up here."""
    from opentelemetry import trace
    from opentelemetry.trace import INVALID_SPAN, NonRecordingSpan, SpanContext, TraceFlags

    from otel_celery_headers.attributes import parent_sampled

    def span_with(flags: int) -> NonRecordingSpan:
        return NonRecordingSpan(SpanContext(0x1F, 0x2E, is_remote=True, trace_flags=TraceFlags(flags)))

    contexts = {
        "none": Context(),
        "empty": context.get_current(),
        "invalid": trace.set_span_in_context(INVALID_SPAN),
        "unsampled": trace.set_span_in_context(span_with(0)),
        "sampled": trace.set_span_in_context(span_with(1)),
        "not a span": trace.set_span_in_context(object()),  # type: ignore[arg-type]
    }
    ctx = contexts[which]
    public = trace.get_current_span(ctx).get_span_context()
    expected = (public.trace_flags.sampled if public.is_valid else None)
    assert parent_sampled(ctx) == expected
    assert expected == {"sampled": True, "unsampled": False}.get(which)
