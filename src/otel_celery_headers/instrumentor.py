"""CeleryHeadersInstrumentor: read options once, wrap and connect; exact mirror on undo."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Collection
from typing import Any

from celery import signals
from celery.app.base import Celery
from celery.app.task import Task
from opentelemetry import metrics, trace
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]
from opentelemetry.instrumentation.utils import unwrap
from wrapt import wrap_function_wrapper

from . import options as options_module
from .consumer import Consumer
from .lifecycle import Flusher
from .metrics import Instruments
from .package import _instruments
from .producer import Producer
from .version import __version__

logger = logging.getLogger("otel_celery_headers")

_SCHEMA_URL = "https://opentelemetry.io/schemas/1.28.0"
_UID = "otel_celery_headers."


def _official_instrumentor() -> Any | None:
    if importlib.util.find_spec("opentelemetry.instrumentation.celery") is None:
        return None
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    return CeleryInstrumentor


def _skip_official(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> None:
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
        producer = Producer(tracer, options, instruments)
        consumer = Consumer(tracer, options, instruments)
        flusher = Flusher(tracer_provider, meter_provider, options.flush_timeout_ms)

        wrap_function_wrapper(Task, "apply_async", producer.wrap_apply_async)
        wrap_function_wrapper(Celery, "send_task", producer.wrap_send_task)
        # dispatch_uid: connecting twice replaces, never doubles, a receiver.
        signals.before_task_publish.connect(
            producer.on_before_publish, weak=False, dispatch_uid=_UID + "publish"
        )
        signals.task_prerun.connect(consumer.on_prerun, weak=False, dispatch_uid=_UID + "prerun")
        signals.task_postrun.connect(
            consumer.on_postrun, weak=False, dispatch_uid=_UID + "postrun"
        )
        signals.worker_process_shutdown.connect(
            flusher.on_process_shutdown, weak=False, dispatch_uid=_UID + "flush"
        )
        self._stand_in_for_official()

    def _uninstrument(self, **kwargs: Any) -> None:
        unwrap(Task, "apply_async")
        unwrap(Celery, "send_task")
        signals.before_task_publish.disconnect(dispatch_uid=_UID + "publish")
        signals.task_prerun.disconnect(dispatch_uid=_UID + "prerun")
        signals.task_postrun.disconnect(dispatch_uid=_UID + "postrun")
        signals.worker_process_shutdown.disconnect(dispatch_uid=_UID + "flush")
        official = _official_instrumentor()
        if official is not None:
            unwrap(official, "_instrument")

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
