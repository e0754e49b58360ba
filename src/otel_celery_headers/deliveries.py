"""Worker deliveries, counted once each where Celery keeps them: the ``Request``.

Celery's worker holds one ``celery.worker.request.Request`` per delivery in the
process that consumes from the broker: the main process of a prefork worker, the
only process of solo, threads, gevent and eventlet. Every outcome reaches it, also
those no pool child can report (a killed child, a message that never reached one),
so ``messaging.client.consumed.messages``, ``messaging.process.duration`` and
``celery.message.queue_time`` are recorded here, for every worker delivery, by one
long-lived writer; pool children record none of them (consumer.py records only eager
executions) and forget the copy of them they inherit at fork (forkmetrics.py).

Where each outcome arrives (Celery 5.3 to 5.7, checked in celery/worker/request.py):

* ``on_accepted``: a pool process started the delivery; time in queue, and the start
  of the duration (billiard's monotonic ``time_accepted``).
* ``on_success(failed=False)``: SUCCESS. A failed result goes on to ``on_failure``.
  Celery builds a ``Request`` subclass per task (``create_request_cls``, looked up
  by ``celery.worker.strategy``) that overrides ``on_success``: we wrap that factory
  and the ``on_success`` of each class it builds, and of those a worker started
  before ``instrument()`` had built (``Request.__subclasses__()``).
* ``on_failure``: the exception decides (Retry, Ignore, Reject, the task's own
  exception), and what Celery does inside tells the rest: a main-process
  ``task_failure`` (hard time limit, lost child), ``reject(requeue=True)`` (a lost
  delivery requeued with ``acks_late`` + ``reject_on_worker_lost``), ``task_retry``
  (Celery 5.7's ``retry_on_worker_lost``). billiard calls ``on_failure`` with
  ``TimeLimitExceeded`` and then ``on_timeout``; Celery 5.7 sends ``task_failure`` from
  both. ``on_timeout(soft=True)`` is a warning only: the task goes on, and the
  ``SoftTimeLimitExceeded`` it may raise arrives through ``on_failure``.
* ``_announce_revoked``: revoked before start, expired, or terminated; the one place
  Celery 5.3 to 5.7 announce each (private: wrapped only if present).
* ``task_unknown`` / ``task_rejected`` signals: a message that never became a Request.

Each delivery is counted once: the first outcome claims it (a flag on the Request,
so a redelivery, a new Request, counts again). No dict keyed by task id: nothing
here outlives the Request.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Mapping
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import Any

from celery.exceptions import (
    Ignore,
    NotRegistered,
    Reject,
    Retry,
    Terminated,
    TimeLimitExceeded,
    WorkerLostError,
)
from opentelemetry import context as otel_context
from opentelemetry.context import Context
from opentelemetry.trace import Tracer
from wrapt import FunctionWrapper, wrap_function_wrapper

from . import attributes as attrs
from . import destinations, endings, quiet
from ._guard import report
from ._outcome import unwrap
from .beat import entry_of
from .delivery_metrics import NO_EXEMPLAR, DeliveryMetrics
from .inbound import Headers, queue_time, redelivered, relate, shape_of
from .logcontext import (
    LogContext,
    message_fields,
    message_inbound,
    request_inbound,
    request_span,
)
from .mainprocess import MainProcessSpans
from .metrics import Instruments
from .options import Options

_ATTR = "_otel_celery_delivery"
# Celery's Request logger (celery/worker/request.py): its "Task accepted" line is DEBUG.
_REQUEST_LOG = logging.getLogger("celery.worker.request")


@dataclass(slots=True)
class _Delivery:
    started: float | None = None  # monotonic, when a pool process accepted it
    # The producer's span only (inbound.exemplar_context), or NO_EXEMPLAR for a task
    # whose trace is a new one (trace shape link or ignore).
    exemplar: Context | None = None
    done: bool = False
    # What Celery did while on_failure / on_timeout ran:
    requeued: bool = False
    retried: bool = False
    failure: BaseException | None = None  # from a main-process task_failure
    # (task name, messaging.system, destination, redelivered) and the beat entry, read
    # at accept for the metrics and kept for the outcome: once per delivery.
    facts: tuple[str, str, str, bool] | None = None
    entry: str | None = None


@dataclass(slots=True, frozen=True)
class Outcome:
    state: str
    error: BaseException | None = None  # sets error.type
    # The main process emits the span: the pool child could not (killed, never ran).
    span: bool = False
    extra: Mapping[str, Any] | None = None


_claim = threading.Lock()
# The delivery whose on_failure / on_timeout runs in this context.
_handling: ContextVar[_Delivery | None] = ContextVar("otel_celery_handling", default=None)


def _delivery(request: Any) -> _Delivery:
    found = getattr(request, _ATTR, None)
    if found is None:
        found = _Delivery()
        setattr(request, _ATTR, found)
    return found


def _signal_name(signum: Any) -> str:
    """``SIGTERM`` for 15 (Celery passes the number; Python 3.11 prints an IntEnum as one)."""
    try:
        return signal.Signals(int(signum)).name
    except (TypeError, ValueError):
        return str(signum)


def _lost(exc: BaseException) -> BaseException:
    """What ended a delivery whose child vanished (Celery 5.7 turns SystemExit into this)."""
    lost: BaseException = exc
    if not isinstance(exc, (TimeLimitExceeded, WorkerLostError)):
        lost = WorkerLostError(f"Worker exited prematurely: {type(exc).__name__}.")
    return lost


class Deliveries:
    def __init__(
        self, tracer: Tracer, options: Options, instruments: Instruments, logs: LogContext
    ) -> None:
        self._options = options
        self._logs = logs
        self._metrics = DeliveryMetrics(instruments)
        self._spans = MainProcessSpans(tracer, options)
        self.active = True

    def start(self, request_cls: type) -> None:
        global _current
        self.active = True
        _current = self
        endings.share()  # before the pool forks: its children write there
        # The Request classes a worker started before instrument() already built.
        pending: list[type] = list(request_cls.__subclasses__())
        while pending:
            cls = pending.pop()
            _hook_subclass(cls)
            pending.extend(cls.__subclasses__())

    def stop(self) -> None:
        global _current
        self.active = False
        if _current is self:
            _current = None

    # -- wrapt wrappers ---------------------------------------------------------------

    def wrap_request_cls(
        self, wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any
    ) -> Any:
        """celery.worker.strategy.create_request_cls: the per-task Request subclass."""
        cls = wrapped(*args, **kwargs)
        _hook_subclass(cls)
        if self._logs.on:  # decided by the strategy that builds this class (logcontext.py)
            _hook_execute(cls)
        return cls

    def wrap_accepted(
        self, wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any
    ) -> Any:
        if not self.active:
            return wrapped(*args, **kwargs)
        # Its debug line, and the revoke of a task terminated before it started: the
        # usual delivery, logged at INFO, makes neither and pays nothing here.
        token = (
            self._logs.enter_request(instance)
            if _REQUEST_LOG.isEnabledFor(logging.DEBUG)
            or getattr(instance, "_terminate_on_ack", None) is not None
            else None
        )
        try:
            try:
                self._accepted(instance, args[1] if len(args) > 1 else kwargs.get("time_accepted"))
            except Exception as exc:  # noqa: BLE001
                report("Request.on_accepted", exc)
            # After: on_accepted may terminate a task revoked before it started.
            return wrapped(*args, **kwargs)
        finally:
            if token is not None:
                otel_context.detach(token)

    def wrap_success(
        self, wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any
    ) -> Any:
        try:
            return wrapped(*args, **kwargs)
        finally:
            if self.active:
                try:
                    result = args[0] if args else kwargs.get("failed__retval__runtime")
                    if not result[0]:  # (failed, retval, runtime); failed: on_failure counts
                        self._finish(instance, Outcome("SUCCESS"))
                except Exception as exc:  # noqa: BLE001
                    report("Request.on_success", exc)

    def wrap_failure(
        self, wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any
    ) -> Any:
        if not self.active:
            return wrapped(*args, **kwargs)
        delivery = _delivery(instance)
        marker = _handling.set(delivery)
        # Celery 5.7's retry_on_worker_lost publishes the retry from here: in the
        # task's trace, as a retry published by the task itself would be.
        activation = self._activate(instance, delivery)
        try:
            return wrapped(*args, **kwargs)
        finally:
            _handling.reset(marker)
            if activation is not None:
                otel_context.detach(activation)
            try:
                exc_info = args[0] if args else kwargs.get("exc_info")
                exc = unwrap(exc_info.exception)
                self._finish(instance, self._after_failure(delivery, exc))
            except Exception as exc:  # noqa: BLE001
                report("Request.on_failure", exc)

    def _activate(self, request: Any, delivery: _Delivery) -> Token[Context] | None:
        try:
            # The whole context (baggage too): what the task's own code would publish with.
            inbound = request_inbound(request)
            shape = shape_of(
                self._options.for_task(str(request.task.name))[1], Headers(request.request_dict)
            )
            base, _, _ = relate(inbound, shape)
            # Celery's own acks and backend writes in here stay quiet (quiet.py); a
            # retry it publishes is lifted by producer.py.
            return otel_context.attach(quiet.carried(base))
        except Exception as exc:  # noqa: BLE001
            report("Request.on_failure context", exc)
            return None

    def wrap_timeout(
        self, wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any
    ) -> Any:
        soft = args[0] if args else kwargs.get("soft")
        if not self.active:
            return wrapped(*args, **kwargs)
        # "Soft/Hard time limit (...) exceeded for ..." is logged in here.
        token = self._logs.enter_request(instance)
        if soft:
            try:
                return wrapped(*args, **kwargs)
            finally:
                if token is not None:
                    otel_context.detach(token)
        delivery = _delivery(instance)
        marker = _handling.set(delivery)
        try:
            return wrapped(*args, **kwargs)
        finally:
            _handling.reset(marker)
            if token is not None:
                otel_context.detach(token)
            try:
                timeout = args[1] if len(args) > 1 else kwargs.get("timeout")
                failure = delivery.failure or TimeLimitExceeded(timeout)
                state = "REQUEUED" if delivery.requeued else "FAILURE"
                self._finish(instance, Outcome(state, failure, span=True))
            except Exception as exc:  # noqa: BLE001
                report("Request.on_timeout", exc)

    def wrap_reject(
        self, wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any
    ) -> Any:
        requeue = args[0] if args else kwargs.get("requeue", False)
        if requeue and not instance.acknowledged:  # Celery rejects only once
            _delivery(instance).requeued = True
        return wrapped(*args, **kwargs)

    def wrap_announce_revoked(
        self, wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any
    ) -> Any:
        result = wrapped(*args, **kwargs)
        if self.active:
            try:
                reason, terminated, signum, _expired = args[:4] if len(args) >= 4 else (
                    kwargs.get("reason"), kwargs.get("terminated"), kwargs.get("signum"),
                    kwargs.get("expired"),
                )
                extra: dict[str, Any] = {
                    attrs.CELERY_REVOKED: True,
                    attrs.CELERY_REVOKED_REASON: str(reason),
                }
                if terminated and signum is not None:
                    extra["celery.task.revoked.signal"] = _signal_name(signum)
                self._finish(instance, Outcome("REVOKED", span=True, extra=extra))
            except Exception as exc:  # noqa: BLE001
                report("Request revoked", exc)
        return result

    # -- signal receivers -------------------------------------------------------------

    def on_task_failure(self, exception: Any = None, **_: Any) -> None:
        delivery = _handling.get()
        if delivery is not None and delivery.failure is None and isinstance(exception, BaseException):
            delivery.failure = unwrap(exception)

    def on_task_retry(self, **_: Any) -> None:
        delivery = _handling.get()
        if delivery is not None:
            delivery.retried = True

    def on_task_unknown(
        self,
        sender: Any = None,
        message: Any = None,
        name: str | None = None,
        id: str | None = None,  # Celery's keyword
        **_: Any,
    ) -> None:
        # What Celery stores as the result (the signal's exc is its KeyError).
        self._message_outcome(sender, message, "UNKNOWN", NotRegistered(name), name, id)

    def on_task_rejected(self, sender: Any = None, message: Any = None, exc: Any = None, **_: Any) -> None:
        # Celery gives no exception for a message with no task name (on_unknown_message).
        failure = exc if isinstance(exc, BaseException) else ValueError("invalid task message")
        self._message_outcome(sender, message, "REJECTED", failure)

    # -- outcomes ---------------------------------------------------------------------

    @staticmethod
    def _after_failure(delivery: _Delivery, exc: BaseException) -> Outcome:
        if isinstance(exc, Retry):
            return Outcome("RETRY")
        if isinstance(exc, Ignore):
            return Outcome("IGNORED")
        if isinstance(exc, Reject):
            return Outcome("REJECTED")
        if delivery.requeued:
            return Outcome("REQUEUED", delivery.failure or _lost(exc), span=True)
        if delivery.retried:  # Celery 5.7 retry_on_worker_lost
            return Outcome("RETRY", delivery.failure or _lost(exc), span=True)
        if delivery.failure is not None:
            # Sent by the main process: the child could not (hard time limit, lost child).
            return Outcome("FAILURE", delivery.failure, span=True)
        if isinstance(exc, WorkerLostError):
            # Celery 5.7: the child had stored SUCCESS before it was lost.
            return Outcome("SUCCESS")
        if isinstance(exc, (Terminated, SystemExit, KeyboardInterrupt)):
            # Stopped by Celery without a revoke (cancelled on connection loss): Celery
            # stores RETRY, and the message is delivered again.
            return Outcome("RETRY", exc, span=True)
        # The task's own exception, Task.throws included: its span is the child's.
        return Outcome("FAILURE", exc)

    def _accepted(self, request: Any, time_accepted: Any) -> None:
        delivery = _delivery(request)
        delivery.started = (
            float(time_accepted) if isinstance(time_accepted, (int, float)) else time.monotonic()
        )
        if not self._metrics.recording():
            # No MeterProvider: nobody records time in queue or exemplars, so the
            # headers are not read (a failure's context is extracted when needed).
            return
        headers = Headers(request.request_dict)
        facts = delivery.facts = self._facts(request)
        entry = delivery.entry = entry_of(headers)
        if shape_of(self._options.for_task(facts[0])[1], headers) != "child":
            # The task's trace is a new one, started in the pool child (the option, or
            # the message's own shape): the main process cannot name it.
            exemplar = NO_EXEMPLAR
        else:
            # The producer's span alone, all an exemplar needs; read once per delivery
            # with the log lines' (logcontext.py).
            exemplar = request_span(request)
        delivery.exemplar = exemplar
        waited = queue_time(headers)
        if waited is not None:
            self._metrics.accepted(*facts, waited, exemplar, entry)

    def _finish(self, request: Any, outcome: Outcome) -> None:
        delivery = _delivery(request)
        with _claim:
            if delivery.done:
                return
            delivery.done = True
        recording = self._metrics.recording()
        if not (outcome.span or recording):
            return  # the usual success, without a MeterProvider: nothing to record
        now = time.monotonic()
        facts = delivery.facts
        if facts is None:  # never accepted, or no MeterProvider then
            facts = self._facts(request)
        name, system, destination, again = facts
        headers = Headers(request.request_dict)
        span = None
        # A child lost after it ended the span (endings.py) has told the trace already;
        # the metric still records what Celery made of the delivery.
        if outcome.span and not endings.ended_in(request.worker_pid, str(request.id)):
            span = self._spans.emit(
                str(request.id), name, system, headers,
                state=outcome.state,
                start=getattr(request, "time_start", None),
                destination=destination,
                redelivered=again,
                failure=outcome.error,
                inbound=request_inbound(request),
                extra={**(outcome.extra or {}),
                       **({attrs.CELERY_DELIVERY_REQUEUED: True} if outcome.state == "REQUEUED" else {})},
            )
        if not recording:
            return
        seconds = None if delivery.started is None else max(0.0, now - delivery.started)
        exemplar = delivery.exemplar if delivery.exemplar is not None else NO_EXEMPLAR
        self._metrics.finished(
            name, system, destination, again, outcome.state, outcome.error, seconds, span,
            exemplar, delivery.entry if delivery.facts is not None else entry_of(headers),
        )

    def _message_outcome(
        self,
        sender: Any,
        message: Any,
        state: str,
        failure: BaseException,
        name: str | None = None,
        task_id: str | None = None,
    ) -> None:
        """A message that never became a Request: its headers are all we have."""
        try:
            # Protocol 1's fields are in the body (logcontext.message_fields).
            headers = message_fields(message)
            task_id = task_id or getattr(headers, "id", None)
            name = str(name or getattr(headers, "task", None) or "unknown")
            app = getattr(sender, "app", None)
            system = attrs.messaging_system(app) if app is not None else "unknown"
            delivery = getattr(message, "delivery_info", None)
            destination = destinations.of_delivery(app, delivery) if app is not None else ""
            again = redelivered(delivery)
            span = self._spans.emit(
                task_id if isinstance(task_id, str) else "", name, system, headers,
                state=state, destination=destination, redelivered=again, failure=failure,
                inbound=message_inbound(message),
            )
            self._metrics.finished(
                name, system, destination, again, state, failure, None, span, NO_EXEMPLAR,
                entry_of(headers),
            )
        except Exception as exc:  # noqa: BLE001
            report(f"task {state.lower()}", exc)

    @staticmethod
    def _facts(request: Any) -> tuple[str, str, str, bool]:
        """(task name, messaging.system, destination, redelivered) of a Request."""
        task = request.task
        delivery_info = request.delivery_info
        return (
            str(task.name),
            attrs.messaging_system(task.app),
            destinations.of_delivery(task.app, delivery_info),
            redelivered(delivery_info),
        )


# The Deliveries of the current instrument(). The on_success wrappers on Celery's
# per-task Request classes outlive an uninstrument() (the worker keeps the classes
# until it rebuilds them), so they dispatch through this and pass through when None.
_current: Deliveries | None = None


def _subclass_on_success(
    wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any
) -> Any:
    current = _current
    if current is None:
        return wrapped(*args, **kwargs)
    return current.wrap_success(wrapped, instance, args, kwargs)


def _subclass_execute(
    wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any
) -> Any:
    """A delivery leaving the timer (eta, rate limit) may be discarded as revoked
    here (``Request.revoked``): its line carries the delivery's trace."""
    current = _current
    token = None if current is None else current._logs.enter_request(instance)
    try:
        return wrapped(*args, **kwargs)
    finally:
        if token is not None:
            otel_context.detach(token)


def _hook(cls: type, method: str, wrapper: Callable[..., Any]) -> None:
    """Wrap a method a per-task Request class overrides (create_request_cls), once
    per class."""
    own = vars(cls).get(method)
    if own is None or isinstance(own, FunctionWrapper):
        return
    try:
        wrap_function_wrapper(cls, method, wrapper)
    except Exception as exc:  # noqa: BLE001
        report(f"Request subclass {method}", exc)


def _hook_execute(cls: type) -> None:
    _hook(cls, "execute_using_pool", _subclass_execute)


def _hook_subclass(cls: type) -> None:
    _hook(cls, "on_success", _subclass_on_success)
