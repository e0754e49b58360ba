"""CeleryHeadersInstrumentor: read options once, wrap and connect; exact mirror on undo."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Collection
from typing import Any

from celery import signals
from celery.app.base import Celery
from celery.app.task import Task
from celery.beat import Scheduler
from celery.worker.request import Request
from opentelemetry import metrics, trace
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]
from opentelemetry.instrumentation.utils import unwrap
from wrapt import wrap_function_wrapper

from . import health as health_module
from . import options as options_module
from .consumer import Consumer
from .lifecycle import Flusher
from .mainprocess import MainProcess
from .metrics import Instruments
from .package import _instruments
from .producer import Producer
from .version import __version__

logger = logging.getLogger("otel_celery_headers")

_SCHEMA_URL = "https://opentelemetry.io/schemas/1.28.0"
_UID = "otel_celery_headers."
_SIGNALS = (
    signals.before_task_publish,
    signals.task_prerun,
    signals.task_postrun,
    signals.worker_process_shutdown,
    signals.task_failure,
    signals.task_revoked,
    signals.task_unknown,
    signals.task_rejected,
    signals.worker_init,
    signals.worker_ready,
    signals.worker_shutdown,
)


def _official_instrumentor() -> Any | None:
    if importlib.util.find_spec("opentelemetry.instrumentation.celery") is None:
        return None
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    return CeleryInstrumentor


# Whether the official instrumentor's instrument() was turned into a no-op by us: its
# BaseInstrumentor flag then says "instrumented" although nothing was connected.
_official_skipped = False


def _skip_official(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> None:
    global _official_skipped
    _official_skipped = True
    logger.info(
        "otel-celery-headers is active: opentelemetry-instrumentation-celery stands "
        "down so each message gets one producer and one consumer span"
    )


class CeleryHeadersInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Traces Celery publishes and task executions, one trace from caller to task body.

    ``instrument()`` keywords are listed in :class:`otel_celery_headers.options.InstrumentKwargs`.
    """

    def instrumentation_dependencies(self) -> Collection[str]:
        return _instruments

    def _instrument(self, **kwargs: Any) -> None:
        options = options_module.load(kwargs)
        tracer_provider = kwargs.get("tracer_provider")
        meter_provider = kwargs.get("meter_provider")
        tracer = trace.get_tracer(
            "otel_celery_headers", __version__, tracer_provider, schema_url=_SCHEMA_URL
        )
        meter = metrics.get_meter(
            "otel_celery_headers", __version__, meter_provider, schema_url=_SCHEMA_URL
        )
        instruments = Instruments.create(meter)
        flusher = Flusher(
            tracer_provider,
            meter_provider,
            options.flush_timeout_ms,
            options.child_flush_interval_ms,
        )
        producer = Producer(tracer, options, instruments)
        consumer = Consumer(tracer, options, instruments, after_task=flusher.task_done)
        main = MainProcess(tracer, options)
        self._flusher: Flusher | None = flusher
        health = health_module.Health(options.queue_length)
        health_module.create_instruments(meter)
        health_module.activate(health)

        wrap_function_wrapper(Task, "apply_async", producer.wrap_apply_async)
        wrap_function_wrapper(Celery, "send_task", producer.wrap_send_task)
        wrap_function_wrapper(Scheduler, "apply_async", producer.wrap_beat_apply_async)
        # Main-process outcomes of tasks that never reach task_postrun (mainprocess.py).
        wrap_function_wrapper(Request, "on_failure", main.wrap_request_handler)
        wrap_function_wrapper(Request, "on_timeout", main.wrap_request_handler)
        receivers: list[tuple[Any, Callable[..., None]]] = [
            (signals.before_task_publish, producer.on_before_publish),
            (signals.task_prerun, consumer.on_prerun),
            (signals.task_postrun, consumer.on_postrun),
            (signals.worker_process_shutdown, flusher.on_process_shutdown),
            (signals.task_failure, main.on_task_failure),
            (signals.task_revoked, main.on_task_revoked),
            (signals.task_unknown, main.on_task_unknown),
            (signals.task_rejected, main.on_task_rejected),
            # Worker and queue health, main process only (health.py).
            (signals.worker_init, health.on_worker_init),
            (signals.worker_ready, health.on_worker_ready),
            (signals.worker_shutdown, health.on_worker_shutdown),
        ]
        for signal, receiver in receivers:
            # dispatch_uid: connecting twice replaces, never doubles, a receiver.
            signal.connect(receiver, weak=False, dispatch_uid=_UID + signal.name)
        self._stand_in_for_official()

    def _uninstrument(self, **kwargs: Any) -> None:
        unwrap(Task, "apply_async")
        unwrap(Celery, "send_task")
        unwrap(Scheduler, "apply_async")
        unwrap(Request, "on_failure")
        unwrap(Request, "on_timeout")
        for signal in _SIGNALS:
            signal.disconnect(dispatch_uid=_UID + signal.name)
        health_module.activate(None)  # its instruments stay in the SDK, and go quiet
        flusher = getattr(self, "_flusher", None)
        if flusher is not None:
            flusher.stop()
            self._flusher = None
        official = _official_instrumentor()
        if official is not None:
            unwrap(official, "_instrument")
            global _official_skipped
            if _official_skipped:
                # Its instrument() did nothing while we stood in: clear its flag so a
                # later instrument() of it really instruments.
                official()._is_instrumented_by_opentelemetry = False
                _official_skipped = False

    @staticmethod
    def _stand_in_for_official() -> None:
        """One producer and one consumer span per message, even beside the official one.

        ``opentelemetry-bootstrap`` installs opentelemetry-instrumentation-celery next
        to us, and both would trace every message. We stand in for it: if it is already
        active it is uninstrumented, and its ``_instrument`` becomes a no-op while we
        are instrumented, whatever order auto-instrumentation loads the two in. To use
        it instead of us: OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=celery_headers.
        """
        official = _official_instrumentor()
        if official is None:
            return
        instance = official()
        if instance.is_instrumented_by_opentelemetry:
            instance.uninstrument()
            logger.info(
                "otel-celery-headers: uninstrumented opentelemetry-instrumentation-celery "
                "so each message gets one producer and one consumer span"
            )
        wrap_function_wrapper(official, "_instrument", _skip_official)
