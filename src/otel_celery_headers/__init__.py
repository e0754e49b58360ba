"""OpenTelemetry instrumentation for Celery: one trace from ``.delay()`` to the task body.

In code::

    from otel_celery_headers import CeleryHeadersInstrumentor

    CeleryHeadersInstrumentor().instrument()

or with no code at all, through the ``opentelemetry_instrumentor`` entry point::

    opentelemetry-instrument celery -A app worker

Every publish (``delay``, ``apply_async``, ``send_task``, canvas, retries) gets a
PRODUCER span and carries the context in the message headers; every execution gets a
CONSUMER span, child of the publish, current while the task body runs.
"""

from __future__ import annotations

from .instrumentor import CeleryHeadersInstrumentor
from .options import InstrumentKwargs, TraceShape
from .version import __version__

__all__ = ["CeleryHeadersInstrumentor", "InstrumentKwargs", "TraceShape", "__version__"]
