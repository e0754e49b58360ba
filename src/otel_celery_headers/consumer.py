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

import math
import sys
import time
from collections.abc import Callable
from contextvars import ContextVar, Token
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import (
    INVALID_SPAN,
    Link,
    Span,
    SpanContext,
    SpanKind,
    TraceFlags,
    Tracer,
)

from . import attributes as attrs
from ._guard import report
from ._outcome import error_type, mark_failed
from .carrier import PREVIOUS_ATTEMPT_HEADER, SENT_AT_HEADER, RequestGetter, find_header
from ._state import current_publish
from .lifecycle import in_pool_child
from .metrics import Instruments
from .options import Options, TraceShape

_GETTER = RequestGetter()

# Celery control flow: the task did not fail, it asked Celery to do something else.
_NOT_ERRORS = frozenset({"RETRY", "IGNORED", "REJECTED"})


@dataclass
class _Execution:
    task_id: str
    span: Span | None  # None for an excluded task: context passes through, no span
    activation: Token[Context]
    started: float
    metric_attributes: dict[str, Any]
    marker: Token[_Execution | None] | None = None
    # Set when an eager task runs inside apply_async(): see _state.current_publish.
    publish_marker: Token[Any] | None = None


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
        after_task: Callable[[], None] | None = None,
    ) -> None:
        self._tracer = tracer
        self._options = options
        self._instruments = instruments
        self._after_task = after_task

    def on_prerun(self, task_id: str | None = None, task: Any = None, **_: Any) -> None:
        if task_id is None or task is None:
            return
        try:
            execution = self._start(task_id, task)
        except Exception as exc:  # noqa: BLE001
            report("task_prerun", exc)
            return
        execution.marker = _current_execution.set(execution)
        if current_publish.get() is not None:
            execution.publish_marker = current_publish.set(None)

    def _start(self, task_id: str, task: Any) -> _Execution:
        request = task.request
        name: str = task.name
        excluded, shape = self._options.for_task(name)
        eager = bool(getattr(request, "is_eager", False))
        inbound = self._inbound(request, eager)

        base, parent, links = relate(inbound, shape)
        retries: object = getattr(request, "retries", 0)
        if retries and shape != "ignore":
            previous = _previous_attempt(request)
            if previous is not None:
                links = [*(links or ()), previous]

        system = attrs.messaging_system(task.app)
        destination = destination_of(getattr(request, "delivery_info", None))
        metric_attributes = {
            attrs.MESSAGING_SYSTEM: system,
            attrs.MESSAGING_OPERATION_NAME: attrs.OPERATION_PROCESS,
            attrs.MESSAGING_DESTINATION_NAME: destination,
            attrs.CELERY_TASK_NAME: name,
        }

        if excluded:
            activation = otel_context.attach(base)
            return _Execution(task_id, None, activation, time.perf_counter(), metric_attributes)

        queue_time = None if eager else _queue_time(request)
        span_attributes: dict[str, Any] = {
            attrs.MESSAGING_SYSTEM: system,
            attrs.MESSAGING_OPERATION_TYPE: attrs.OPERATION_PROCESS,
            attrs.MESSAGING_OPERATION_NAME: attrs.OPERATION_PROCESS,
            attrs.MESSAGING_DESTINATION_NAME: destination,
            attrs.MESSAGING_MESSAGE_ID: task_id,
            attrs.CELERY_TASK_NAME: name,
        }
        request_attributes(request, span_attributes)
        if eager:
            span_attributes[attrs.CELERY_TASK_EAGER] = True
        if shape != "child":
            span_attributes[attrs.CELERY_TRACE_SHAPE] = shape
        if queue_time is not None:
            span_attributes[attrs.CELERY_QUEUE_TIME] = queue_time
            self._instruments.queue_time.record(queue_time, metric_attributes)

        span = self._tracer.start_span(
            f"{attrs.OPERATION_PROCESS} {name}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes=span_attributes,
            links=links,
        )
        hook = self._options.process_hook
        if hook is not None:
            try:
                hook(span, task)
            except Exception as exc:  # noqa: BLE001 - the user's hook must not break a task
                report("process_hook", exc)
        activation = otel_context.attach(trace.set_span_in_context(span, base))
        return _Execution(task_id, span, activation, time.perf_counter(), metric_attributes)

    @staticmethod
    def _inbound(request: Any, eager: bool) -> Context:
        inbound = extract(request)
        if eager and not trace.get_current_span(inbound).get_span_context().is_valid:
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
            self._finish(execution, task, state, retval)
            if self._after_task is not None:
                self._after_task()
        except Exception as exc:  # noqa: BLE001
            report("task_postrun", exc)

    def _finish(self, execution: _Execution, task: Any, state: str | None, retval: Any) -> None:
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
                return
            state = "FAILURE" if failure is not None else None
            retval = failure
        failed = state == "FAILURE" and isinstance(retval, BaseException)
        exc = unwrap(retval) if failed else None
        expected = exc is not None and _is_expected(task, exc)
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
        metric_attributes[attrs.CELERY_TASK_STATE] = state or "UNKNOWN"
        if exc is not None and not expected:
            metric_attributes[attrs.ERROR_TYPE] = error_type(exc)
        self._instruments.processed(time.perf_counter() - execution.started, metric_attributes)


def relate(inbound: Context, shape: TraceShape) -> tuple[Context, Context, list[Link] | None]:
    """(context made current, parent of the span, links) for a trace shape."""
    if shape == "child":
        return inbound, inbound, None
    if shape == "link":
        # A new trace that still carries the producer's baggage (the official
        # instrumentation's link mode drops it).
        remote = trace.get_current_span(inbound).get_span_context()
        base = trace.set_span_in_context(INVALID_SPAN, inbound)
        return base, base, [Link(remote)] if remote.is_valid else None
    # "ignore": the inbound context is not trusted at all.
    empty = Context()
    return empty, empty, None


def extract(carrier: object) -> Context:
    """The producer's context from a request or headers; a fresh Context if none.

    Never the thread's current context: a worker thread must not hand one task's
    context to the next (solo, threads and gevent pools reuse threads and greenlets).
    """
    try:
        return propagate.extract(carrier, context=Context(), getter=_GETTER)
    except Exception as exc:  # noqa: BLE001 - a malformed header starts a new trace
        report("extract", exc)
        return Context()


_FROM_REQUEST = (
    ("root_id", attrs.MESSAGING_MESSAGE_CONVERSATION_ID),
    ("parent_id", attrs.CELERY_TASK_PARENT_ID),
    ("group", attrs.CELERY_TASK_GROUP_ID),
    ("hostname", attrs.CELERY_WORKER_HOSTNAME),
    ("eta", attrs.CELERY_TASK_ETA),
)


def request_attributes(request: Any, into: dict[str, Any]) -> None:
    """Celery facts of a ``task.request`` (or a message's headers) as span attributes."""
    for key, attr in _FROM_REQUEST:
        value = getattr(request, key, None)
        if isinstance(value, str):
            into[attr] = value
    retries = getattr(request, "retries", 0)
    into[attrs.CELERY_TASK_RETRIES] = retries if isinstance(retries, int) else 0


def destination_of(delivery_info: Any) -> str:
    if not isinstance(delivery_info, dict):
        return ""
    return str(delivery_info.get("routing_key") or delivery_info.get("exchange") or "")


def attempt_context(task_id: object) -> SpanContext | None:
    """The span context of the running execution of ``task_id``, if this is inside it.

    A task that retries (or replaces itself) publishes a message with its own id from
    inside its execution; producer.py then records this attempt on the new message.
    """
    execution = _current_execution.get()
    if execution is None or execution.span is None or execution.task_id != task_id:
        return None
    return execution.span.get_span_context()


def _previous_attempt(request: Any) -> Link | None:
    value = find_header(request, PREVIOUS_ATTEMPT_HEADER)
    if value is None:
        return None
    trace_hex, _, span_hex = value.partition("-")
    try:
        context = SpanContext(
            trace_id=int(trace_hex, 16),
            span_id=int(span_hex, 16),
            is_remote=True,
            trace_flags=TraceFlags(TraceFlags.SAMPLED),
        )
    except ValueError:
        return None
    if not context.is_valid:
        return None
    return Link(context, {"celery.link": "previous_attempt"})


def unwrap(exc: BaseException) -> BaseException:
    """billiard wraps exceptions crossing the pool pipe in ExceptionWithTraceback."""
    inner = getattr(exc, "exc", None)
    if type(exc).__name__ == "ExceptionWithTraceback" and isinstance(inner, BaseException):
        return inner
    return exc


def _is_expected(task: Any, exc: BaseException) -> bool:
    throws = getattr(task, "throws", None) or ()
    try:
        return bool(throws) and isinstance(exc, tuple(throws))
    except TypeError:
        return False


def _queue_time(request: Any) -> float | None:
    """Seconds between publish (or the eta, if later) and now; never negative.

    A task with a countdown did not "wait" before its eta. Clocks of producer and
    worker machines differ: a negative difference is skew, reported as zero.
    """
    sent = find_header(request, SENT_AT_HEADER)
    if sent is None:
        return None
    try:
        ready = float(sent)
    except ValueError:
        return None
    if not math.isfinite(ready):  # "inf", "nan": not a time, and not a metric value
        return None
    eta = getattr(request, "eta", None)
    if isinstance(eta, str):
        try:
            ready = max(ready, datetime.fromisoformat(eta).timestamp())
        except ValueError:
            pass
    return max(0.0, time.time() - ready)
