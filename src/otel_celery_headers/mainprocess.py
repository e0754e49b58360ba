"""Worker main process: the span of a delivery whose pool child could not report it.

A pool child that is killed (hard time limit, OOM, ``os._exit``) never sends
``task_postrun``, and a revoked, expired, unknown or rejected message never reaches a
child at all. Without a span from the main process such a delivery is a hole in the
trace. deliveries.py decides when (once per delivery); this module builds the span:
one ended CONSUMER span in the producer's trace, with the outcome, from the message
headers the main process still holds.
"""

from __future__ import annotations

from typing import Any

from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Tracer

from . import attributes as attrs
from ._outcome import mark_failed
from .inbound import extract, relate, request_attributes, shape_of
from .options import Options


class MainProcessSpans:
    def __init__(self, tracer: Tracer, options: Options) -> None:
        self._tracer = tracer
        self._options = options

    def emit(
        self,
        task_id: str,
        name: str,
        system: str,
        carrier: Any,
        *,
        state: str,
        start: float | None = None,
        destination: str = "",
        redelivered: bool = False,
        failure: BaseException | None = None,
        extra: dict[str, Any] | None = None,
        inbound: Context | None = None,
    ) -> Span | None:
        """One ended span for this delivery; None for an excluded task."""
        excluded, shape = self._options.for_task(name)
        if excluded:
            return None
        shape = shape_of(shape, carrier)
        # inbound: the context already extracted from these headers (logcontext.py).
        _, parent, links = relate(extract(carrier) if inbound is None else inbound, shape)
        attributes: dict[str, Any] = {
            attrs.MESSAGING_SYSTEM: system,
            attrs.MESSAGING_OPERATION_TYPE: attrs.OPERATION_PROCESS,
            attrs.MESSAGING_OPERATION_NAME: attrs.OPERATION_PROCESS,
            attrs.MESSAGING_DESTINATION_NAME: destination,
            attrs.CELERY_TASK_NAME: name,
            attrs.CELERY_TASK_STATE: state,
        }
        if task_id:
            attributes[attrs.MESSAGING_MESSAGE_ID] = task_id
        if redelivered:
            attributes[attrs.CELERY_DELIVERY_REDELIVERED] = True
        if shape != "child":  # as on the pool child's span (consumer.py)
            attributes[attrs.CELERY_TRACE_SHAPE] = shape
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
        if failure is not None and state != "REVOKED":
            mark_failed(span, failure)
        span.end()
        return span
