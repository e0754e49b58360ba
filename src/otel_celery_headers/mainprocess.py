"""Worker main process: a span for every task that never reached task_postrun.

A pool child that is killed (hard time limit, OOM, ``os._exit``) never sends
``task_postrun``, and a revoked, expired, unknown or rejected message never reaches a
child at all. Without this module such a task is a hole in the trace. The main
process knows about each case and still has the message headers, so it emits one
ended CONSUMER span in the producer's trace, with the outcome:

* ``task_failure`` sent while Celery's main-process ``Request.on_failure`` /
  ``Request.on_timeout`` runs, for ``TimeLimitExceeded`` or ``WorkerLostError``: ERROR.
  Failures raised inside the task are sent from the child's tracer instead and are
  handled by consumer.py; a ContextVar set around those two Request methods tells the
  two apart. Celery 5.7 sends ``task_failure`` twice for a hard time limit (once from
  ``on_timeout``, again from ``on_failure``): a task id already emitted is skipped.
* ``task_revoked`` (revoked before start, terminated while running, or expired): not
  an error; ``celery.task.revoked.reason`` says which.
* ``task_unknown`` (no such task registered) and ``task_rejected`` (invalid message): ERROR.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from types import SimpleNamespace
from typing import Any

from opentelemetry.trace import SpanKind, Tracer

from . import attributes as attrs
from ._guard import report
from ._outcome import mark_failed, unwrap
from .inbound import destination_of, extract, relate, request_attributes
from .options import Options

# The Celery Request whose main-process failure handler is running in this context.
_handling: ContextVar[Any] = ContextVar("otel_celery_main_request", default=None)

_LOST = ("TimeLimitExceeded", "WorkerLostError")


class MainProcess:
    def __init__(self, tracer: Tracer, options: Options) -> None:
        self._tracer = tracer
        self._options = options
        # Bounded memory of task ids already given a span here (dedupe only).
        self._recent: deque[str] = deque(maxlen=2048)
        self._recent_set: set[str] = set()

    # -- wrapt wrapper for Request.on_failure / Request.on_timeout -------------------

    def wrap_request_handler(
        self, wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any
    ) -> Any:
        marker = _handling.set(instance)
        try:
            return wrapped(*args, **kwargs)
        finally:
            _handling.reset(marker)

    # -- signal receivers -------------------------------------------------------------

    def on_task_failure(
        self, sender: Any = None, task_id: str | None = None, exception: Any = None, **_: Any
    ) -> None:
        request = _handling.get()
        if request is None or task_id is None or not isinstance(exception, BaseException):
            return
        try:
            exc = unwrap(exception)
            if type(exc).__name__ not in _LOST:
                return
            self._emit(
                task_id,
                str(getattr(sender, "name", None) or getattr(request, "name", "unknown")),
                getattr(sender, "app", None),
                SimpleNamespace(**request.request_dict),
                start=getattr(request, "time_start", None),
                state="FAILURE",
                failure=exc,
            )
        except Exception as inner:  # noqa: BLE001
            report("task_failure (main process)", inner)

    def on_task_revoked(
        self,
        sender: Any = None,
        request: Any = None,
        terminated: bool = False,
        signum: Any = None,
        expired: bool = False,
        **_: Any,
    ) -> None:
        if request is None:
            return
        try:
            task_id = getattr(request, "id", None)
            if not isinstance(task_id, str):
                return
            running = _handling.get()
            reason = "expired" if expired else "terminated" if terminated else "revoked"
            extra: dict[str, Any] = {
                attrs.CELERY_REVOKED: True,
                attrs.CELERY_REVOKED_REASON: reason,
            }
            if terminated and signum is not None:
                extra["celery.task.revoked.signal"] = str(signum)
            self._emit(
                task_id,
                getattr(sender, "name", None) or "unknown",
                getattr(sender, "app", None),
                request,
                start=getattr(running, "time_start", None) if running is not None else None,
                state="REVOKED",
                extra=extra,
            )
        except Exception as inner:  # noqa: BLE001
            report("task_revoked", inner)

    def on_task_unknown(
        self,
        sender: Any = None,
        message: Any = None,
        exc: Any = None,
        name: str | None = None,
        id: str | None = None,  # noqa: A002 - Celery's keyword
        **_: Any,
    ) -> None:
        failure = exc if isinstance(exc, BaseException) else LookupError(f"unknown task {name!r}")
        self._emit_for_message("task_unknown", sender, message, "UNKNOWN", failure, name, id)

    def on_task_rejected(
        self, sender: Any = None, message: Any = None, exc: Any = None, **_: Any
    ) -> None:
        failure = exc if isinstance(exc, BaseException) else ValueError("invalid task message")
        self._emit_for_message("task_rejected", sender, message, "REJECTED", failure)

    def _emit_for_message(
        self,
        where: str,
        sender: Any,
        message: Any,
        state: str,
        failure: BaseException,
        name: str | None = None,
        task_id: str | None = None,
    ) -> None:
        """A message that never became a task: its headers are all we have."""
        try:
            headers = getattr(message, "headers", None)
            carrier = SimpleNamespace(**headers) if isinstance(headers, Mapping) else SimpleNamespace()
            task_id = task_id or getattr(carrier, "id", None)
            self._emit(
                task_id if isinstance(task_id, str) else "",
                str(name or getattr(carrier, "task", None) or "unknown"),
                getattr(sender, "app", None),
                carrier,
                delivery=getattr(message, "delivery_info", None),
                state=state,
                failure=failure,
            )
        except Exception as inner:  # noqa: BLE001
            report(where, inner)

    # -- the span ---------------------------------------------------------------------

    def _emit(
        self,
        task_id: str,
        name: str,
        app: Any,
        carrier: Any,
        *,
        state: str,
        start: float | None = None,
        delivery: Any = None,
        failure: BaseException | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        if task_id:
            if task_id in self._recent_set:
                return
            if len(self._recent) == self._recent.maxlen:
                self._recent_set.discard(self._recent[0])
            self._recent.append(task_id)
            self._recent_set.add(task_id)
        excluded, shape = self._options.for_task(name)
        if excluded:
            return
        _, parent, links = relate(extract(carrier), shape)
        if delivery is None:
            delivery = getattr(carrier, "delivery_info", None)
        attributes: dict[str, Any] = {
            attrs.MESSAGING_SYSTEM: attrs.messaging_system(app) if app is not None else "unknown",
            attrs.MESSAGING_OPERATION_TYPE: attrs.OPERATION_PROCESS,
            attrs.MESSAGING_OPERATION_NAME: attrs.OPERATION_PROCESS,
            attrs.MESSAGING_DESTINATION_NAME: destination_of(delivery),
            attrs.CELERY_TASK_NAME: name,
            attrs.CELERY_TASK_STATE: state,
        }
        if task_id:
            attributes[attrs.MESSAGING_MESSAGE_ID] = task_id
        request_attributes(carrier, attributes)
        if extra:
            attributes.update(extra)
        start_ns = int(start * 1e9) if isinstance(start, (int, float)) and start > 0 else None
        span = self._tracer.start_span(
            f"{attrs.OPERATION_PROCESS} {name}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes=attributes,
            links=links,
            start_time=start_ns,
        )
        if failure is not None:
            mark_failed(span, failure)
        span.end()

