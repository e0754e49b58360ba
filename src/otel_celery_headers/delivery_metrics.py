"""The three delivery metrics, as deliveries.py records them in the worker's main process.

Attributes are bounded (messaging system, queue, operation, task name, state, error
type; the beat entry and ``celery.delivery.redelivered`` where they apply). The
histograms carry exemplars (the SDK's trace-based filter, its default since before
1.28) that open the task's trace: ``record()`` gets a context holding a span of that
trace, since the main process has no current span of its own.
"""

from __future__ import annotations

from typing import Any

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


#: Attribute sets kept for reuse never grow past this; beyond, the cache starts over.
_CACHE_MAX = 4096


class DeliveryMetrics:
    """Records on the main process's one thread, for every delivery of the pool.

    The attribute dicts are built once per attribute set and handed to the SDK again
    and again (issue 18: the main process limits a prefork worker's throughput). The
    SDK keeps the dict of a new series as that series' attributes, so a cached dict is
    never changed after it is built; an outcome with an error type builds its own.
    """

    def __init__(self, instruments: Instruments) -> None:
        self._instruments = instruments
        self._cache: dict[tuple[Any, ...], dict[str, Any]] = {}

    def recording(self) -> bool:
        """Whether a MeterProvider is behind the instruments (Instruments.recording)."""
        return self._instruments.recording()

    def _attributes(
        self,
        name: str,
        system: str,
        destination: str,
        redelivered: bool,
        beat_entry: str | None,
        state: str | None = None,
    ) -> dict[str, Any]:
        key = (name, system, destination, redelivered, beat_entry, state)
        found = self._cache.get(key)
        if found is None:
            found = attrs.metric_attributes(
                system, attrs.OPERATION_PROCESS, name, destination,
                beat_entry=beat_entry, redelivered=redelivered,
            )
            if state is not None:
                found[attrs.CELERY_TASK_STATE] = state
            if len(self._cache) >= _CACHE_MAX:  # task names are few; send_task() takes any
                self._cache.clear()
            self._cache[key] = found
        return found

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
        attributes = self._attributes(name, system, destination, redelivered, beat_entry)
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
        metric_attributes = self._attributes(
            name, system, destination, redelivered, beat_entry, state
        )
        if error is not None:
            metric_attributes = {**metric_attributes, attrs.ERROR_TYPE: error_type_of(error)}
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
