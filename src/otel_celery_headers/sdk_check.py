"""Publishing process and pool child: one warning when spans would go nowhere.

``pip install otel-celery-headers`` and ``opentelemetry-instrument celery -A proj
worker`` instrument Celery, but without ``opentelemetry-distro`` (or an SDK set up by
hand) the global tracer provider stays the API's proxy, and every span is a no-op:
the user sees nothing and is told nothing. The first publish or task of a process
checks once; a configured provider gives no line, and no message ever pays again.

Checked at the first message, not in ``instrument()``: ``opentelemetry-instrument``
and many applications configure the SDK after instrumenting, and a prefork pool
child may configure its own in ``worker_process_init`` (the main process, which runs
no task, is never asked). Once per process: each pool child that has no SDK says
so for itself, since each would lose its own spans.
"""

from __future__ import annotations

import logging

from opentelemetry import trace
from opentelemetry.trace import NoOpTracerProvider, ProxyTracerProvider

logger = logging.getLogger("otel_celery_headers")

MESSAGE = (
    "otel-celery-headers: no OpenTelemetry SDK is configured in this process (the "
    "global tracer provider is the API's %s), so Celery is instrumented but no span is "
    "recorded or exported. Install opentelemetry-distro and an exporter "
    "(pip install opentelemetry-distro opentelemetry-exporter-otlp) and run under "
    "opentelemetry-instrument with OTEL_SERVICE_NAME and OTEL_EXPORTER_OTLP_ENDPOINT "
    "set, or set a TracerProvider before the first task (or pass tracer_provider= to "
    "instrument()). This is logged once."
)


class SdkCheck:
    """Shared by the producer and the consumer of one instrument(): one line per process."""

    __slots__ = ("pending",)

    def __init__(self, explicit_provider: object | None, pending: bool = True) -> None:
        #: A tracer_provider given to instrument() is the caller's choice: never second-guessed.
        self.pending = pending and explicit_provider is None

    def run(self) -> None:
        """Called by the first message while ``pending``; never raises."""
        self.pending = False
        try:
            provider = trace.get_tracer_provider()
            if isinstance(provider, (ProxyTracerProvider, NoOpTracerProvider)):
                logger.warning(MESSAGE, type(provider).__name__)
        except Exception:  # noqa: BLE001,S110 - a warning must never break a publish
            pass
