"""CeleryHeadersInstrumentor: read options once, wrap and connect; exact mirror on undo."""

from __future__ import annotations

import importlib.util
import logging
import sys
from collections.abc import Collection
from typing import Any

from billiard.pool import Pool as BilliardPool
from celery import signals
from celery.app.base import Celery
from celery.app.task import Task
from celery.beat import Scheduler
from celery.utils.dispatch import Signal
from celery.worker import strategy
from celery.worker.pidbox import gPidbox
from celery.worker.request import Request
from kombu.asynchronous.timer import Entry as TimerEntry
from kombu.message import Message
from opentelemetry import metrics, trace
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]
from opentelemetry.instrumentation.utils import unwrap
from wrapt import register_post_import_hook, wrap_function_wrapper

from . import beat as beat_module
from . import forkmetrics
from . import health as health_module
from . import options as options_module
from . import quiet as quiet_module
from .consumer import Consumer
from .deliveries import Deliveries
from .lifecycle import Flusher
from .logcontext import LogContext
from .metrics import Instruments
from .package import _instruments
from .producer import Producer
from .queue_length import QueueLengths
from .quiet import Quiet
from .sdk_check import SdkCheck
from .version import __version__

logger = logging.getLogger("otel_celery_headers")

_SCHEMA_URL = "https://opentelemetry.io/schemas/1.28.0"
_UID = "otel_celery_headers."
# Request method -> the Deliveries wrapper that counts what it tells (deliveries.py).
_REQUEST_HOOKS = {
    "on_accepted": "wrap_accepted",
    "on_success": "wrap_success",
    "on_failure": "wrap_failure",
    "on_timeout": "wrap_timeout",
    "reject": "wrap_reject",
    "_announce_revoked": "wrap_announce_revoked",
}
# The worker's Consumer is named, never imported by us: celery.worker.consumer.consumer
# binds celery.app.trace.build_tracer by name when it is imported, and Sentry's Celery
# integration patches that module attribute in sentry_sdk.init(). Imported by us before
# the user's sentry_sdk.init() (at our import, or in instrument() called first), the
# module kept the unpatched name, and a solo, threads, gevent or eventlet worker (whose
# tracers the Consumer builds) ran every task outside Sentry's transaction: no Sentry
# worker transaction, no Sentry headers on a chain's next step or a retry. Its wraps wait
# for the worker to import it (a post-import hook), after the app module's sentry_sdk.init().
_CONSUMER = "Consumer"
_CONSUMER_MODULE = "celery.worker.consumer.consumer"
# Everything instrument() does to Celery, and uninstrument() undoes, from one table
# each: (where, attribute, part, method) wraps ``where.attribute`` with
# ``<part>.<method>``; (signal, part, method) connects ``<part>.<method>``. The parts
# are the objects _instrument() builds (its ``parts`` dict).
_WRAPS: tuple[tuple[Any, str, str, str], ...] = (
    (Task, "apply_async", "producer", "wrap_apply_async"),
    (Celery, "send_task", "producer", "wrap_send_task"),
    (Scheduler, "apply_async", "producer", "wrap_beat_apply_async"),
    (Scheduler, "populate_heap", "beat", "wrap_populate_heap"),
    # Every worker delivery, counted where its Request lives (deliveries.py).
    (strategy, "create_request_cls", "deliveries", "wrap_request_cls"),
    *((Request, method, "deliveries", hook) for method, hook in _REQUEST_HOOKS.items()),
    # Main-process log lines about a delivery carry its trace (logcontext.py).
    (strategy, "default", "logs", "wrap_strategy"),
    (_CONSUMER, "on_unknown_task", "logs", "wrap_message_handler"),
    (_CONSUMER, "on_invalid_task", "logs", "wrap_message_handler"),
)
# The worker's own broker traffic under suppression (quiet.py), wrapped only while
# suppress_broker_traffic is on: nothing is paid per ack when it is off.
_QUIET_WRAPS: tuple[tuple[Any, str, str, str], ...] = (
    (_CONSUMER, "start", "quiet", "wrap_quiet"),
    # Its warm shutdown: pidbox unbind (SREM), unacked restore, queue cleanup.
    (_CONSUMER, "stop", "quiet", "wrap_quiet"),
    (_CONSUMER, "shutdown", "quiet", "wrap_quiet"),
    (Message, "ack", "quiet", "wrap_quiet"),
    (Message, "reject", "quiet", "wrap_quiet"),
    (Message, "requeue", "quiet", "wrap_quiet"),
    # gevent and eventlet pools: the pidbox loop is a greenlet of its own
    # (celery/worker/pidbox.py gPidbox), each timer entry too (heartbeats, unacked
    # restore); every other pool runs timer entries in its loop or timer thread.
    (gPidbox, "loop", "quiet", "wrap_quiet"),
    (TimerEntry, "__call__", "quiet", "wrap_quiet"),
    (QueueLengths, "_run", "quiet", "wrap_quiet"),
    (BilliardPool, "_create_worker_process", "quiet", "wrap_fork"),
)
_SIGNALS: tuple[tuple[Signal, str, str], ...] = (
    (signals.before_task_publish, "producer", "on_before_publish"),
    (signals.task_prerun, "consumer", "on_prerun"),
    (signals.task_postrun, "consumer", "on_postrun"),
    (signals.worker_process_shutdown, "flusher", "on_process_shutdown"),
    (signals.task_failure, "deliveries", "on_task_failure"),
    (signals.task_retry, "deliveries", "on_task_retry"),
    (signals.task_unknown, "deliveries", "on_task_unknown"),
    (signals.task_rejected, "deliveries", "on_task_rejected"),
    # Worker and queue health, main process only (health.py).
    (signals.worker_init, "health", "on_worker_init"),
    (signals.worker_ready, "health", "on_worker_ready"),
    (signals.worker_shutdown, "health", "on_worker_shutdown"),
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
        sdk = SdkCheck(tracer_provider)
        beat = beat_module.BeatMonitor()
        beat_module.create_instruments(meter, beat)
        beat_module.activate(beat)
        producer = Producer(tracer, options, instruments, sdk, beat)
        consumer = Consumer(tracer, options, instruments, after_task=flusher.task_done, sdk=sdk)
        logs = LogContext(options)
        quiet = Quiet()
        self._quiet: Quiet | None = quiet
        deliveries = Deliveries(tracer, options, instruments, logs)
        self._flusher: Flusher | None = flusher
        self._deliveries: Deliveries | None = deliveries
        self._logs: LogContext | None = logs
        deliveries.start(Request)
        forkmetrics.forget_in_children(instruments.all())
        health = health_module.Health(options.queue_length, options.metrics_worker_hostname)
        health_module.create_instruments(meter)
        health_module.activate(health)

        parts: dict[str, Any] = {
            "producer": producer,
            "consumer": consumer,
            "deliveries": deliveries,
            "flusher": flusher,
            "logs": logs,
            "quiet": quiet,
            "health": health,
            "beat": beat,
        }
        if options.suppress_broker_traffic:
            quiet_module.warn_if_ignored()
        wraps = _WRAPS + (_QUIET_WRAPS if options.suppress_broker_traffic else ())
        # What uninstrument() unwraps: only these, so that with the option off it does
        # not strip another library's wrapper of kombu's Message.ack and the like.
        self._wraps: tuple[tuple[Any, str, str, str], ...] = wraps
        self._consumer_wraps: tuple[tuple[str, Any], ...] = tuple(
            (attribute, getattr(parts[part], method))
            for where, attribute, part, method in wraps
            if where is _CONSUMER
        )
        if _CONSUMER_MODULE in sys.modules:
            self._wrap_consumer(sys.modules[_CONSUMER_MODULE])
        else:
            _hook_consumer_import()
        for where, attribute, part, method in wraps:
            # hasattr: _announce_revoked is private (Celery 5.3 to 5.7).
            if where is not _CONSUMER and hasattr(where, attribute):
                wrap_function_wrapper(where, attribute, getattr(parts[part], method))
        for signal, part, method in _SIGNALS:
            # dispatch_uid: connecting twice replaces, never doubles, a receiver.
            signal.connect(
                getattr(parts[part], method), weak=False, dispatch_uid=_UID + signal.name
            )
        self._stand_in_for_official()

    def _wrap_consumer(self, module: Any) -> None:
        """The Consumer wraps this instrument() decided, once its module is imported."""
        for attribute, wrapper in getattr(self, "_consumer_wraps", ()):
            wrap_function_wrapper(module.Consumer, attribute, wrapper)

    def _uninstrument(self, **kwargs: Any) -> None:
        self._consumer_wraps = ()  # a hook still waiting for the import wraps nothing
        consumer_module = sys.modules.get(_CONSUMER_MODULE)
        for where, attribute, _, _ in getattr(self, "_wraps", _WRAPS + _QUIET_WRAPS):
            if where is _CONSUMER:
                if consumer_module is not None:
                    unwrap(consumer_module.Consumer, attribute)
            elif hasattr(where, attribute):
                unwrap(where, attribute)  # a no-op where nothing was wrapped
        quiet = getattr(self, "_quiet", None)
        if quiet is not None:
            quiet.active = False  # a running consumer's start() stays wrapped until it returns
            self._quiet = None
        deliveries = getattr(self, "_deliveries", None)
        if deliveries is not None:
            deliveries.stop()
            self._deliveries = None
        forkmetrics.stop()
        logs = getattr(self, "_logs", None)
        if logs is not None:
            logs.stop()
            self._logs = None
        for signal, _, _ in _SIGNALS:
            signal.disconnect(dispatch_uid=_UID + signal.name)
        health_module.activate(None)  # its instruments stay in the SDK, and go quiet
        beat_module.activate(None)
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


_consumer_hooked = False


def _hook_consumer_import() -> None:
    """Once per process: the Consumer's wraps applied when the worker imports its module
    (wrapt's post-import hook), as the instrumentor then stands (instrumented or not)."""
    global _consumer_hooked
    if not _consumer_hooked:
        _consumer_hooked = True
        register_post_import_hook(_on_consumer_import, _CONSUMER_MODULE)


def _on_consumer_import(module: Any) -> None:
    CeleryHeadersInstrumentor()._wrap_consumer(module)
