"""Worker side: extraction, the CONSUMER span across task_prerun/task_postrun, outcome.

``task_prerun`` and ``task_postrun`` are sent by ``celery.app.trace.build_tracer``
from the same call, in the same thread (or greenlet), around the task body; postrun
is sent from a ``finally`` so it comes on every path that ran prerun. The span is
started in prerun and made current with ``context.attach`` (the seed article's
``use_span().__enter__()`` without an exit never restored the context), and the
token is detached in postrun. The per-execution state sits in a ContextVar, so it
cannot outlive the execution and nothing grows with the number of tasks run.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, Tracer

from . import attributes as attrs
from . import destinations, endings, fanin, lifecycle
from ._guard import report
from ._outcome import error_type, is_expected, mark_failed, unwrap
from ._state import current_publish
from .arguments import Recorder
from .beat import entry_of
from .carrier import SENT_AT_HEADER, TRACE_SHAPE_HEADER, own_header
from .fanin import ChordPart
from .inbound import (
    asked_shape,
    extract,
    previous_attempt,
    queue_time,
    redelivered,
    relate,
    waited_since,
)
from .lifecycle import in_pool_child
from .metrics import Instruments
from .options import Options
from .sdk_check import SdkCheck


@dataclass(slots=True)
class _Execution:
    task_id: str
    span: Span | None  # None for an excluded task: context passes through, no span
    activation: Token[Context]
    started: float
    metric_attributes: dict[str, Any] | None  # None: this process does not count it
    marker: Token[_Execution | None] | None = None
    # Set when an eager task runs inside apply_async(): see _state.current_publish.
    publish_marker: Token[Any] | None = None
    # Set for a chord header task: what producer.py needs when this task sends the body.
    chord: ChordPart | None = None


# The execution running in this context. Eager tasks nest (a task body calling
# apply() runs another task inline), and each postrun restores the outer one.
_current_execution: ContextVar[_Execution | None] = ContextVar(
    "otel_celery_execution", default=None
)


class Consumer:
    def __init__(
        self,
        tracer: Tracer,
        options: Options,
        instruments: Instruments,
        after_task: Callable[[], bool] | None = None,
        sdk: SdkCheck | None = None,
    ) -> None:
        self._tracer = tracer
        self._sdk = sdk or SdkCheck(None, pending=False)
        self._options = options
        self._instruments = instruments
        #: Called after every task; returns False when it has nothing to do in this
        #: process, which then stops calling it (until a fork: asked again there).
        self._after_task = after_task
        self._quiet_in = -1  # the lifecycle.generation after_task said so in
        # Worker deliveries are counted by the worker's main process (deliveries.py),
        # unless instrument() ran in this pool child itself (worker_process_init): then
        # the main process is not instrumented, and the child counts what it runs.
        self._home = lifecycle.generation
        self._counting_decided_in = -1  # the generation _counting was decided for
        self._counting = False
        self._tells_endings = False  # endings.written_here(), for the same generation
        self._arguments = Recorder.of(options)

    def _decide_counting(self) -> None:
        """Per process: whether it records the delivery metrics of what it runs (only a
        pool child that ran instrument() itself; a forked copy of us never does), and
        whether it tells the main process which spans it ended (a forked copy does)."""
        self._counting = lifecycle.generation == self._home and in_pool_child()
        self._tells_endings = endings.written_here()
        self._counting_decided_in = lifecycle.generation

    def on_prerun(
        self,
        task_id: str | None = None,
        task: Any = None,
        args: Any = None,
        kwargs: Any = None,
        **_: Any,
    ) -> None:
        if task_id is None or task is None:
            return
        if self._sdk.pending:
            self._sdk.run()
        try:
            execution = self._start(task_id, task)
        except Exception as exc:  # noqa: BLE001
            report("task_prerun", exc)
            return
        if self._arguments is not None and execution.span is not None:
            self._arguments.record(execution.span, task.name, args, kwargs)
        execution.marker = _current_execution.set(execution)
        if current_publish.get() is not None:
            execution.publish_marker = current_publish.set(None)

    def _start(self, task_id: str, task: Any) -> _Execution:
        # task.request is Celery's Context, whose class gives every field read here a
        # default: plain attribute reads, cheaper than getattr(..., default).
        request = task.request
        name: str = task.name
        excluded, shape = self._options.for_task(name)
        if shape != "ignore":
            # The publisher's choice for this message (scoped.trace_shape, a beat
            # entry's headers) beats the per-task option, except "ignore": a context
            # this worker does not trust cannot vouch for itself in a header.
            asked = request.__dict__.get(TRACE_SHAPE_HEADER)
            if asked is not None:
                shape = asked_shape(asked, shape)
        eager = bool(request.is_eager)
        inbound = extract(request)
        if eager:
            inbound = self._eager_inbound(inbound)

        links: list[Link] | None = None
        if shape == "child":  # the default, without a call (see relate())
            base = parent = inbound
        else:
            base, parent, links = relate(inbound, shape)
        if shape != "ignore":
            retries: object = request.retries
            if retries:
                previous = previous_attempt(request)
                if previous is not None:
                    links = [*(links or ()), previous]
            # A chord's body is sent by its last header task, from inside that task;
            # a message sent from outside any task (protocol 2 then gives it a root
            # but no parent) cannot be one: no lookup for the usual case.
            headers = (
                None
                if request.parent_id is None and request.root_id is not None
                else own_header(request, fanin.CHORD_LINKS_HEADER)
            )
            if headers is not None:  # a chord body: one link per header task
                links = [*(links or ()), *fanin.links_from(headers)]

        system = attrs.messaging_system(task.app)
        delivery_info = request.delivery_info
        destination = destinations.of_delivery(task.app, delivery_info)
        again = redelivered(delivery_info)
        # Worker deliveries are counted by the process holding their Request
        # (deliveries.py): no metric attributes are built here for nobody.
        metric_attributes: dict[str, Any] | None = None
        if self._counting_decided_in != lifecycle.generation:
            self._decide_counting()
        if self._tells_endings:  # a pool child: the previous task's record is done with
            endings.starting()
        if eager or self._counting:
            metric_attributes = attrs.metric_attributes(
                system, attrs.OPERATION_PROCESS, name, destination,
                beat_entry=entry_of(request), redelivered=again,
            )

        if excluded:
            activation = otel_context.attach(base)
            return _Execution(task_id, None, activation, time.perf_counter(), metric_attributes)

        # Time in queue: parsed only if a metric or a recording span uses it.
        waited = None
        if not eager and metric_attributes is not None:
            waited = queue_time(request)
            if waited is not None:
                # A copy: _finish adds the outcome to metric_attributes later, and SDK
                # 1.28 keeps a reference to the dict it was given.
                self._instruments.queue_time.record(waited, dict(metric_attributes))

        # The sampler sees the start attributes (attrs.start_attributes). Under a
        # sampled producer the span will almost surely record: every attribute goes in
        # at start, in one pass. Otherwise the rest is built only if the span records:
        # at 1% sampling, 99 tasks in 100 would build them for nobody (issue 12).
        attributes: dict[str, Any] = attrs.start_attributes(
            system, attrs.OPERATION_PROCESS, destination, name
        )
        if again:  # a start attribute: a sampler may keep every redelivery
            attributes[attrs.CELERY_DELIVERY_REDELIVERED] = True
        in_sampled_trace = attrs.parent_sampled(parent)
        if in_sampled_trace:
            self._span_attributes(request, task_id, eager, shape, waited, attributes)
        span = self._tracer.start_span(
            f"{attrs.OPERATION_PROCESS} {name}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes=attributes,
            links=links,
        )
        if not in_sampled_trace and span.is_recording():
            span.set_attributes(self._span_attributes(request, task_id, eager, shape, waited, {}))
        hook = self._options.process_hook
        if hook is not None:
            try:
                hook(span, task)
            except Exception as exc:  # noqa: BLE001 - the user's hook must not break a task
                report("process_hook", exc)
        activation = otel_context.attach(trace.set_span_in_context(span, base))
        execution = _Execution(task_id, span, activation, time.perf_counter(), metric_attributes)
        try:  # the context is attached: nothing below may keep us from returning it
            if request.chord and self._options.chord_links:
                part = fanin.part_of(request, task.backend)
                if part is not None:
                    fanin.remember(part, span.get_span_context())
                    execution.chord = part
        except Exception as exc:  # noqa: BLE001
            report("chord header", exc)
        return execution

    @staticmethod
    def _span_attributes(
        request: Any,
        task_id: str,
        eager: bool,
        shape: str,
        waited: float | None,
        into: dict[str, Any],
    ) -> dict[str, Any]:
        """The process span's attributes beyond the start ones, added to ``into``.

        The facts inbound.request_attributes() reads from any request, read here as
        plain attributes of Celery's Context (see _start), one line each.
        """
        into[attrs.MESSAGING_OPERATION_NAME] = attrs.OPERATION_PROCESS
        into[attrs.MESSAGING_MESSAGE_ID] = task_id
        if isinstance(value := request.root_id, str):
            into[attrs.MESSAGING_MESSAGE_CONVERSATION_ID] = value
        if isinstance(value := request.parent_id, str):
            into[attrs.CELERY_TASK_PARENT_ID] = value
        if isinstance(value := request.group, str):
            into[attrs.CELERY_TASK_GROUP_ID] = value
        if isinstance(value := request.eta, str):
            into[attrs.CELERY_TASK_ETA] = value
        if isinstance(value := request.hostname, str):
            into[attrs.CELERY_WORKER_HOSTNAME] = value
        retries = request.retries
        into[attrs.CELERY_TASK_RETRIES] = retries if isinstance(retries, int) else 0
        if eager:
            into[attrs.CELERY_TASK_EAGER] = True
        if shape != "child":
            into[attrs.CELERY_TRACE_SHAPE] = shape
        if (entry := entry_of(request)) is not None:
            into[attrs.CELERY_BEAT_ENTRY] = entry
        if waited is None and not eager:
            # Where we write it (the top level: the Context's own attributes), without
            # a call; own_header() also looks where an eager apply(headers=) puts it.
            sent = request.__dict__.get(SENT_AT_HEADER)
            if not isinstance(sent, str):
                sent = own_header(request, SENT_AT_HEADER)
            waited = waited_since(sent, request.eta)
        if waited is not None:
            into[attrs.CELERY_QUEUE_TIME] = waited
        return into

    @staticmethod
    def _eager_inbound(inbound: Context) -> Context:
        if not trace.get_current_span(inbound).get_span_context().is_valid:
            # apply() / task_always_eager: no message, the caller is right here.
            return otel_context.get_current()
        return inbound

    def on_postrun(
        self,
        task_id: str | None = None,
        task: Any = None,
        state: str | None = None,
        retval: Any = None,
        **_: Any,
    ) -> None:
        execution = _current_execution.get()
        if execution is None or execution.task_id != task_id:
            return
        try:
            if execution.publish_marker is not None:
                current_publish.reset(execution.publish_marker)
            if execution.marker is not None:
                _current_execution.reset(execution.marker)
            otel_context.detach(execution.activation)
        except Exception as exc:  # noqa: BLE001
            report("task_postrun detach", exc)
        try:
            if self._finish(execution, task, state, retval) and self._tells_endings:
                # Before the flush is kicked: once it is flushed, the main process
                # does not emit a span of its own for this delivery (endings.py).
                endings.ended(execution.task_id)
            # Until it says it has nothing to do in this process (then once per pid).
            after_task = self._after_task
            quiet = self._quiet_in == lifecycle.generation
            if after_task is not None and not quiet and not after_task():
                self._quiet_in = lifecycle.generation
        except Exception as exc:  # noqa: BLE001
            report("task_postrun", exc)

    def _finish(self, execution: _Execution, task: Any, state: str | None, retval: Any) -> bool:
        """End the span and count the execution; False if the span is left to the
        main process."""
        span = execution.span
        metric_attributes = execution.metric_attributes
        if state is None:
            # An eager apply(throw=True) re-raises before postrun is sent from a
            # `finally`; the exception in flight is the task's.
            failure = sys.exc_info()[1]
            if isinstance(failure, (SystemExit, KeyboardInterrupt)) and in_pool_child():
                # The child is being stopped under the task: billiard turns the
                # SIGTERM of a hard time limit or `revoke(terminate=True)` into
                # SystemExit. The main process reports the real outcome in one span
                # (mainprocess.py); this one is dropped unended so there are not two.
                return False
            state = "FAILURE" if failure is not None else None
            retval = failure
        failed = state == "FAILURE" and isinstance(retval, BaseException)
        exc = unwrap(retval) if failed else None
        expected = exc is not None and is_expected(task, exc)
        if span is not None:
            if state is not None:
                span.set_attribute(attrs.CELERY_TASK_STATE, state)
            if exc is not None and not expected:
                mark_failed(span, exc)
            elif exc is not None:
                # Task.throws: an expected outcome, logged by Celery without a
                # traceback; recorded, but the span is not an error.
                span.set_attribute(attrs.ERROR_TYPE, error_type(exc))
            elif state == "RETRY":
                reason = getattr(retval, "exc", None) or getattr(retval, "message", None)
                if reason is not None:
                    span.set_attribute(attrs.CELERY_RETRY_REASON, str(reason))
            span.end()
        if metric_attributes is None:
            return True
        metric_attributes[attrs.CELERY_TASK_STATE] = state or "UNKNOWN"
        if exc is not None:  # Task.throws too: the task failed, as its span says
            metric_attributes[attrs.ERROR_TYPE] = error_type(exc)
        self._instruments.processed(time.perf_counter() - execution.started, metric_attributes)
        return True


def publishing_from() -> tuple[str, SpanContext | None, ChordPart | None] | None:
    """(task id, span context, chord part) of the execution publishing now, if any.

    producer.py needs two facts about it: a task that retries (or replaces itself)
    publishes a message with its own id, and that message records this attempt; a
    chord header that finishes the chord publishes the body, which links to headers.
    """
    execution = _current_execution.get()
    if execution is None or execution.span is None:
        return None
    return execution.task_id, execution.span.get_span_context(), execution.chord
