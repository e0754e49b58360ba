"""OpenTelemetry instrumentation for Celery: one trace from ``.delay()`` to the task body.

In code::

    from otel_celery_headers import CeleryHeadersInstrumentor

    CeleryHeadersInstrumentor().instrument()

or with no code at all, through the ``opentelemetry_instrumentor`` entry point::

    opentelemetry-instrument celery -A app worker

Every publish (``delay``, ``apply_async``, ``send_task``, canvas, retries) gets a
PRODUCER span and carries the context in the message headers; every execution gets a
CONSUMER span, child of the publish, current while the task body runs.

``with trace_shape("link"): group(...).delay()`` gives each task of the group a trace
of its own, linked to its publish (docs/shape-and-volume.md).
"""

from __future__ import annotations

from .carrier import TRACE_SHAPE_HEADER
from .instrumentor import CeleryHeadersInstrumentor
from .options import InstrumentKwargs, TraceShape
from .scoped import trace_shape
from .version import __version__

__all__ = [
    "TRACE_SHAPE_HEADER",
    "CeleryHeadersInstrumentor",
    "InstrumentKwargs",
    "TraceShape",
    "__version__",
    "trace_shape",
]
