"""Publish side: the PRODUCER span around the real publish, and injection.

Two wrapt wrappers open the span: ``Task.apply_async`` (``delay``, signatures, canvas,
``retry``) and ``Celery.send_task`` (a web app that knows only a task's name calls
``send_task`` directly). ``apply_async`` calls ``send_task``, so a ContextVar marks a
publish already traced and the inner wrapper passes through: one span per message.

Injection happens in ``before_task_publish``, into the real message headers Celery is
about to publish, so every message carries the context, also ones published by
Celery itself (chain steps, callbacks, chord bodies) from inside a worker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, MutableMapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.trace import Span, SpanKind, Tracer

from . import attributes as attrs
from ._guard import report
from ._outcome import error_type, mark_failed
from .carrier import (
    PREVIOUS_ATTEMPT_HEADER,
    SENT_AT_HEADER,
    HeaderSetter,
    bound_baggage,
    drop_fields,
)
from .consumer import attempt_context
from .metrics import Instruments
from .options import Options

logger = logging.getLogger("otel_celery_headers")

_SETTER = HeaderSetter()


@dataclass
class _Publish:
    """One traced publish: lives for the duration of one apply_async/send_task call."""

    span: Span
    started: float
    metric_attributes: dict[str, Any] = field(default_factory=dict)


# The publish being traced in this context, so the nested send_task() of an
# apply_async() does not open a second span, and before_task_publish knows which span
# is ours to annotate (the current span may be a web request's or a task's).
_current_publish: ContextVar[_Publish | None] = ContextVar("otel_celery_publish", default=None)

# The `celery beat` schedule entry being sent, named on its publish span.
_beat_entry: ContextVar[str | None] = ContextVar("otel_celery_beat_entry", default=None)


class Producer:
    def __init__(self, tracer: Tracer, options: Options, instruments: Instruments) -> None:
        self._tracer = tracer
        self._options = options
        self._instruments = instruments
        self._fields_of: TextMapPropagator | None = None
        self._fields: frozenset[str] = frozenset()
        self._baggage_warned = False

    # -- wrapt wrappers -------------------------------------------------------------

    def wrap_apply_async(
        self, wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any
    ) -> Any:
        return self._traced(wrapped, args, kwargs, "apply_async", self._start_apply_async, instance)

    def wrap_send_task(
        self, wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any
    ) -> Any:
        if _current_publish.get() is not None:  # inside apply_async: already traced
            return wrapped(*args, **kwargs)
        name = args[0] if args else kwargs.get("name")
        return self._traced(wrapped, args, kwargs, "send_task", self._start, str(name), instance)

    def _start_apply_async(self, task: Any) -> _Publish | None:
        app = task._get_app()
        # Eager mode runs the task inline and publishes nothing: the task's own
        # CONSUMER span is then a child of the caller (see consumer.py).
        if app.conf.task_always_eager:
            return None
        return self._start(task.name, app)

    def _traced(
        self,
        wrapped: Callable[..., Any],
        args: Any,
        kwargs: Any,
        where: str,
        start: Callable[..., _Publish | None],
        *start_args: Any,
    ) -> Any:
        # Already inside a traced publish (apply_async -> send_task): one span only.
        if _current_publish.get() is not None:
            return wrapped(*args, **kwargs)
        try:
            publish = start(*start_args)
        except Exception as exc:  # noqa: BLE001
            report(where, exc)
            publish = None
        if publish is None:
            return wrapped(*args, **kwargs)
        return self._run(publish, wrapped, args, kwargs)

    def wrap_beat_apply_async(
        self, wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any
    ) -> Any:
        """``celery beat`` sends a due entry: one new trace per entry, named after it."""
        try:
            entry = args[0] if args else kwargs.get("entry")
            name = getattr(entry, "name", None)
        except Exception as exc:  # noqa: BLE001
            report("beat apply_async", exc)
            name = None
        # A fresh root context: whatever runs beat (`worker -B`, an embedding app)
        # must not become the parent of every periodic task.
        activation = otel_context.attach(otel_context.Context())
        marker = _beat_entry.set(str(name) if name is not None else None)
        try:
            return wrapped(*args, **kwargs)
        finally:
            _beat_entry.reset(marker)
            otel_context.detach(activation)

    def _start(self, name: str, app: Any) -> _Publish:
        system = attrs.messaging_system(app)
        attributes = {
            attrs.MESSAGING_SYSTEM: system,
            attrs.MESSAGING_OPERATION_TYPE: attrs.OPERATION_SEND,
            attrs.MESSAGING_OPERATION_NAME: attrs.OPERATION_SEND,
            attrs.CELERY_TASK_NAME: name,
        }
        entry = _beat_entry.get()
        if entry is not None:
            attributes[attrs.CELERY_BEAT_ENTRY] = entry
        span = self._tracer.start_span(
            f"{attrs.OPERATION_SEND} {name}", kind=SpanKind.PRODUCER, attributes=attributes
        )
        return _Publish(
            span,
            time.perf_counter(),
            {
                attrs.MESSAGING_SYSTEM: system,
                attrs.MESSAGING_OPERATION_NAME: attrs.OPERATION_SEND,
                attrs.CELERY_TASK_NAME: name,
            },
        )

    def _run(
        self, publish: _Publish, wrapped: Callable[..., Any], args: Any, kwargs: Any
    ) -> Any:
        marker = _current_publish.set(publish)
        activation = otel_context.attach(trace.set_span_in_context(publish.span))
        try:
            return wrapped(*args, **kwargs)
        except BaseException as exc:
            # The caller gets this very exception back, untouched (bare raise below).
            self._failed(publish, exc)
            raise
        finally:
            # Restore the caller's context before anything else: even if ending the
            # span failed, the caller must not be left inside our PRODUCER span.
            otel_context.detach(activation)
            _current_publish.reset(marker)
            self._end(publish)

    def _failed(self, publish: _Publish, exc: BaseException) -> None:
        try:
            mark_failed(publish.span, exc)
            publish.metric_attributes[attrs.ERROR_TYPE] = error_type(exc)
        except Exception as inner:  # noqa: BLE001
            report("publish failure", inner)

    def _end(self, publish: _Publish) -> None:
        try:
            publish.span.end()
            self._instruments.published(
                time.perf_counter() - publish.started, publish.metric_attributes
            )
        except Exception as exc:  # noqa: BLE001
            report("publish end", exc)

    # -- before_task_publish --------------------------------------------------------

    def on_before_publish(
        self,
        sender: str | None = None,
        headers: MutableMapping[str, Any] | None = None,
        routing_key: str | None = None,
        exchange: str | None = None,
        **_: Any,
    ) -> None:
        if headers is None:
            return
        try:
            self._inject(headers)
            publish = _current_publish.get()
            if publish is not None:
                self._annotate(publish, sender, headers, routing_key, exchange)
        except Exception as exc:  # noqa: BLE001
            report("before_task_publish", exc)

    def _inject(self, headers: MutableMapping[str, Any]) -> None:
        ctx = otel_context.get_current()
        textmap = propagate.get_global_textmap()
        fields = self._propagation_fields(textmap)
        if not fields.isdisjoint(headers) and trace.get_current_span(ctx).get_span_context().is_valid:
            # A retry or replace republishes the previous message's headers: remove
            # that stale context so nothing of the old one survives our injection.
            drop_fields(headers, fields)
        textmap.inject(headers, context=ctx, setter=_SETTER)
        baggage = headers.get("baggage")
        if isinstance(baggage, str) and len(baggage) > self._options.max_baggage_bytes:
            self._bound_baggage(headers, baggage)
        headers[SENT_AT_HEADER] = f"{time.time():.6f}"
        attempt = attempt_context(headers.get("id"))
        if attempt is not None:
            headers[PREVIOUS_ATTEMPT_HEADER] = f"{attempt.trace_id:032x}-{attempt.span_id:016x}"

    def _propagation_fields(self, textmap: TextMapPropagator) -> frozenset[str]:
        # CompositePropagator.fields builds a new set on every call: cache it for the
        # propagator object in use (the global one can be replaced at any time).
        if textmap is not self._fields_of:
            self._fields = frozenset(textmap.fields)
            self._fields_of = textmap
        return self._fields

    def _bound_baggage(self, headers: MutableMapping[str, Any], baggage: str) -> None:
        bounded, dropped = bound_baggage(baggage, self._options.max_baggage_bytes)
        if bounded:
            headers["baggage"] = bounded
        else:
            headers.pop("baggage", None)
        if dropped and not self._baggage_warned:
            self._baggage_warned = True
            logger.warning(
                "otel-celery-headers: baggage of %d bytes exceeds max_baggage_bytes=%d; "
                "dropped %d member(s) from the end (logged once)",
                len(baggage.encode("utf-8")),
                self._options.max_baggage_bytes,
                dropped,
            )

    def _annotate(
        self,
        publish: _Publish,
        sender: str | None,
        headers: MutableMapping[str, Any],
        routing_key: str | None,
        exchange: str | None,
    ) -> None:
        span = publish.span
        destination = routing_key or exchange or ""
        publish.metric_attributes[attrs.MESSAGING_DESTINATION_NAME] = destination
        if span.is_recording():
            task_id = headers.get("id")
            root_id = headers.get("root_id")
            values: dict[str, Any] = {attrs.MESSAGING_DESTINATION_NAME: destination}
            if isinstance(task_id, str):
                values[attrs.MESSAGING_MESSAGE_ID] = task_id
            if isinstance(root_id, str):
                values[attrs.MESSAGING_MESSAGE_CONVERSATION_ID] = root_id
            for key, attr in (
                ("parent_id", attrs.CELERY_TASK_PARENT_ID),
                ("group", attrs.CELERY_TASK_GROUP_ID),
                ("eta", attrs.CELERY_TASK_ETA),
            ):
                value = headers.get(key)
                if isinstance(value, str):
                    values[attr] = value
            retries = headers.get("retries")
            if isinstance(retries, int) and retries:
                values[attrs.CELERY_TASK_RETRIES] = retries
            span.set_attributes(values)
        hook = self._options.publish_hook
        if hook is not None:
            try:
                hook(span, sender or "", headers)
            except Exception as exc:  # noqa: BLE001 - the user's hook must not break a publish
                report("publish_hook", exc)
