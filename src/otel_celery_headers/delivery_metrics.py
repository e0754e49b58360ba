"""The three delivery metrics, as deliveries.py records them in the worker's main process.

Attributes are bounded (messaging system, queue, operation, task name, state, error
type; the beat entry and ``celery.delivery.redelivered`` where they apply). The
histograms carry exemplars (the SDK's trace-based filter, its default since before
1.28) that open the task's trace: ``record()`` gets a context holding a span of that
trace, since the main process has no current span of its own.
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import INVALID_SPAN, Span

from . import attributes as attrs
from ._outcome import error_type
from .metrics import Instruments

#: A context whose span is invalid: the trace-based exemplar filter samples nothing.
#: (Not an empty Context: the SDK reads ``context or get_current()``, and an empty
#: Context is falsy.)
NO_EXEMPLAR = trace.set_span_in_context(INVALID_SPAN)


class DeliveryMetrics:
    def __init__(self, instruments: Instruments) -> None:
        self._instruments = instruments

    def recording(self) -> bool:
        """Whether a MeterProvider is behind the instruments (Instruments.recording)."""
        return self._instruments.recording()

    def accepted(
        self,
        name: str,
        system: str,
        destination: str,
        redelivered: bool,
        waited: float,
        exemplar: Context,
        beat_entry: str | None = None,
    ) -> None:
        """Time in queue of a delivery a pool process started; ``exemplar``: the
        producer's span, or NO_EXEMPLAR (deliveries.py decides, by the message's shape)."""
        attributes = attrs.metric_attributes(
            system, attrs.OPERATION_PROCESS, name, destination,
            beat_entry=beat_entry, redelivered=redelivered,
        )
        self._instruments.waited(waited, attributes, exemplar)

    def finished(
        self,
        name: str,
        system: str,
        destination: str,
        redelivered: bool,
        state: str,
        error: BaseException | None,
        seconds: float | None,
        span: Span | None,
        exemplar: Context,
        beat_entry: str | None = None,
    ) -> None:
        """One delivery; ``seconds`` None for one that never started; ``exemplar`` as
        for ``accepted``."""
        metric_attributes = attrs.metric_attributes(
            system, attrs.OPERATION_PROCESS, name, destination,
            beat_entry=beat_entry, redelivered=redelivered,
        )
        metric_attributes[attrs.CELERY_TASK_STATE] = state
        if error is not None:
            metric_attributes[attrs.ERROR_TYPE] = error_type_of(error)
        if seconds is None:
            self._instruments.processed(None, metric_attributes)
            return
        # The span emitted by the main process, else the producer's (the child's span
        # is its child), unless the task's trace is a new one (trace shape link or
        # ignore, by option or by the message): the main process cannot name that trace.
        context = trace.set_span_in_context(span) if span is not None else exemplar
        self._instruments.processed(seconds, metric_attributes, context)


def error_type_of(exc: BaseException) -> str:
    """``error.type``; for an exception Celery could not pickle across the pool pipe
    (``UnpickleableExceptionWrapper``), the original class it names."""
    module = getattr(exc, "exc_module", None)
    cls_name = getattr(exc, "exc_cls_name", None)
    if isinstance(module, str) and isinstance(cls_name, str):
        return cls_name if module == "builtins" else f"{module}.{cls_name}"
    return error_type(exc)
