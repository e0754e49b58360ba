"""Worker main process: the log lines Celery writes about a delivery carry its trace.

opentelemetry-instrumentation-logging's record factory (``otelTraceID``, ``otelSpanID``,
``otelTraceSampled``, ``otelServiceName``) and the logs bridge's ``LoggingHandler`` both
read the *current* context when a record is made. In a pool child our CONSUMER span is
current while the task runs (consumer.py), but the worker's main process logs about a
delivery with nothing current: "Task ... received" (celery/worker/strategy.py),
"Discarding revoked task" (``Request.revoked``), "Hard time limit (...) exceeded"
(``Request.on_timeout``), "Received unregistered task" / "Received invalid task
message" (``Consumer.on_unknown_task`` / ``on_invalid_task``), Celery 5.3 to 5.7.

Around each of those we make the producer's context current: the task's span lives in
the pool child, the main process knows only the producer's span, from the headers.
Attached and detached in the same frame, never across callbacks.

Whether it is worth doing is decided when the worker's consumer builds its task
strategies (``celery.worker.strategy.default``, at every consumer start): by then Celery
has set up logging and auto-instrumentation has installed its record factory and
handlers. Off (the default record factory, no OpenTelemetry handler), the strategy is
Celery's own and no Request class gets a wrapper: nothing is paid per delivery.

A log line needs only the producer's span (trace id, span id, sampled), not its
baggage: the span is read from our ``traceparent`` alone (``inbound.exemplar_context``,
what the delivery metrics' exemplars use too) and kept on kombu's ``Message`` (its
``__slots__`` include ``__dict__``), which every Request keeps as ``_message``: the
strategy, the Request's callbacks and deliveries.py share one parse, and it goes when
the message goes (no dict keyed by task id). The whole context, baggage included, is
extracted only where Celery may publish from the main process (``on_failure``: Celery
5.7's ``retry_on_worker_lost``) and kept apart.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextvars import Token
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context

from . import quiet
from ._guard import report
from .carrier import TRACE_SHAPE_HEADER
from .inbound import Headers, exemplar_context, extract, relate, shape_of
from .options import Options, TraceShape

_STASH = "_otel_celery_inbound"  # the whole context
_SPAN_STASH = "_otel_celery_span"  # the producer's span only


def wanted() -> bool:
    """Whether a log record may read the current context: a record factory other than
    logging's own (opentelemetry-instrumentation-logging's), or a handler of an
    ``opentelemetry`` package (the logs bridge) on any logger."""
    if logging.getLogRecordFactory() is not logging.LogRecord:
        return True
    loggers: list[Any] = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for each in loggers:
        for handler in getattr(each, "handlers", ()):
            if type(handler).__module__.startswith("opentelemetry"):
                return True
    return False


def _remember(message: Any, inbound: Context, key: str = _STASH) -> Context:
    try:
        setattr(message, key, inbound)
    except (AttributeError, TypeError):  # not a kombu Message: parse again next time
        pass
    return inbound


def message_fields(message: Any) -> Headers:
    """A kombu message's task fields: its headers, or protocol 1's body with its headers.

    Protocol 1 puts the task's fields in the body and our context in the message's
    headers (celery/app/amqp.py ``as_task_v1`` publishes ``headers={}`` plus what the
    producer injects): both are read, the headers winning.
    """
    headers = getattr(message, "headers", None)
    if not isinstance(headers, dict):
        headers = {}
    if "task" not in headers:
        try:  # protocol 1 (kombu caches the decode)
            payload = getattr(message, "payload", None)
        except Exception:  # noqa: BLE001 - an undecodable body carries no context
            payload = None
        if isinstance(payload, dict) and "task" in payload:
            headers = {**payload, **headers}
    return Headers(headers)


def message_inbound(message: Any) -> Context:
    """The producer's context of a kombu message, extracted once per delivery."""
    found = getattr(message, _STASH, None)
    if isinstance(found, Context):
        return found
    return _remember(message, extract(message_fields(message)))


def message_span(message: Any) -> Context:
    """The producer's span of a kombu message (no baggage), read once per delivery."""
    found = getattr(message, _SPAN_STASH, None)
    if isinstance(found, Context):
        return found
    return _remember(message, exemplar_context(message_fields(message)), _SPAN_STASH)


def request_span(request: Any) -> Context:
    """The producer's span of a Request (no baggage): for its log lines and its metrics'
    exemplars, shared with its message's other readers."""
    message = getattr(request, "_message", None)
    found = getattr(message, _SPAN_STASH, None)
    if isinstance(found, Context):
        return found
    return _remember(message, exemplar_context(Headers(request.request_dict)), _SPAN_STASH)


def request_inbound(request: Any) -> Context:
    """The producer's whole context of a Request, shared with its message's other readers."""
    message = getattr(request, "_message", None)
    found = getattr(message, _STASH, None)
    if isinstance(found, Context):
        return found
    return _remember(message, extract(Headers(request.request_dict)))


class LogContext:
    def __init__(self, options: Options) -> None:
        self._options = options
        self.on = False

    def stop(self) -> None:
        self.on = False

    def enter_request(self, request: Any) -> Token[Context] | None:
        """Make a Request's context current; the caller detaches in the same frame."""
        if not self.on:
            return None
        try:
            excluded, shape = self._options.for_task(str(request.task.name))
            if excluded:
                return None
            # The message's own shape (scoped.trace_shape, a beat entry's header), as the
            # pool child's span and the main process's spans take it (inbound.shape_of).
            shape = shape_of(shape, Headers(request.request_dict))
            base = relate(request_span(request), shape)[0]
            if trace.get_current_span() is trace.get_current_span(base):
                return None  # inside the strategy's handler already: nothing to add
            return otel_context.attach(quiet.carried(base))
        except Exception as exc:  # noqa: BLE001
            report("log context", exc)
            return None

    def _enter_message(
        self, message: Any, name: str, rule: tuple[bool, TraceShape] | None = None
    ) -> Token[Context] | None:
        """``rule``: the task's ``for_task``, when the caller has it already."""
        try:
            excluded, shape = self._options.for_task(name) if rule is None else rule
            if excluded:
                return None
            headers = getattr(message, "headers", None)
            if type(headers) is dict and "task" in headers:
                # Protocol 2, the usual message, read in place: no shape header at the
                # top level and no nested dict (where own_header also looks) keeps the
                # rule's shape.
                carrier = Headers(headers)
                if TRACE_SHAPE_HEADER in headers or "headers" in headers:
                    shape = shape_of(shape, carrier)
                found = getattr(message, _SPAN_STASH, None)
                span = (
                    found if isinstance(found, Context)
                    else _remember(message, exemplar_context(carrier), _SPAN_STASH)
                )
            else:
                shape = shape_of(shape, message_fields(message))
                span = message_span(message)
            # Celery's own acks and backend writes in here stay quiet (quiet.py).
            base = span if shape == "child" else relate(span, shape)[0]
            return otel_context.attach(quiet.carried(base))
        except Exception as exc:  # noqa: BLE001
            report("log context", exc)
            return None

    # -- wrapt wrappers ---------------------------------------------------------------

    def wrap_strategy(
        self, wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any
    ) -> Any:
        """celery.worker.strategy.default(task, app, consumer): the delivery handler."""
        self.on = wanted()  # before wrapped: it builds the Request class (deliveries.py)
        handler = wrapped(*args, **kwargs)
        if not self.on:
            return handler
        task = args[0] if args else kwargs.get("task")
        name = str(getattr(task, "name", ""))
        # The task's rule, fixed for this strategy's life (the options do not change).
        rule = self._options.for_task(name)

        def with_context(message: Any, *rest: Any, **more: Any) -> Any:
            token = self._enter_message(message, name, rule) if self.on else None
            try:
                return handler(message, *rest, **more)
            finally:
                if token is not None:
                    otel_context.detach(token)

        return with_context

    def wrap_message_handler(
        self, wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any
    ) -> Any:
        """Consumer.on_unknown_task / on_invalid_task(body, message, exc)."""
        if not self.on:
            return wrapped(*args, **kwargs)
        message = args[1] if len(args) > 1 else kwargs.get("message")
        headers = getattr(message, "headers", None)
        name = headers.get("task") if isinstance(headers, dict) else None
        token = self._enter_message(message, str(name or "unknown"))
        try:
            return wrapped(*args, **kwargs)
        finally:
            if token is not None:
                otel_context.detach(token)
