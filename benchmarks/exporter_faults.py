"""Tasks per second through Redis and a solo worker when the span exporter is healthy, raises, or blocks.

Every variant is ``CeleryHeadersInstrumentor`` with a ``TracerProvider`` and a default
``BatchSpanProcessor`` (queue 2048, batches of 512, every 5 s) in front of one of:

``healthy``
    counts the spans and drops them;
``raising``
    raises ``RuntimeError`` on every export (a bug, a bad endpoint);
``blocking``
    sleeps 1 s in every export (a collector that does not answer), so the queue fills
    and the processor drops spans.

For each round and variant (order rotating from round to round):

1. this process, instrumented with that exporter, publishes N tasks with
   ``apply_async`` under an active span to a fresh queue (publish rate: tasks/s);
2. a worker subprocess (``celery worker -P solo``), instrumented with the same exporter,
   drains the queue (worker rate: tasks/s from the start of the first task to the end
   of the last, so the worker's start-up is not counted).

The two sides are measured apart and do not compete for the CPU. Medians over rounds,
and each faulty variant's rate relative to ``healthy`` in the same round, are printed.
Target: a faulty exporter costs less than 10%. "worker exports" and "spans exported" are
what the worker's exporter was handed by the time the last task ended (the rest is
still queued, or was dropped by the processor).

    python benchmarks/exporter_faults.py                   # about a minute
    python benchmarks/exporter_faults.py --tasks 5000 --rounds 5 --json faults.json
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import redis
from _common import (
    Tally,
    add_worker_options,
    counting_task,
    drain_queue,
    paired_summary,
    redis_server,
    run_rounds,
    run_solo_worker,
    worker_app,
    write_json,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

VARIANTS = ("healthy", "raising", "blocking")
TASK = "bench.faults"


class Exporter(SpanExporter):
    """One of the three behaviours; counts calls and the spans it was handed."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.calls = 0
        self.spans = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self._lock:
            self.calls += 1
            self.spans += len(spans)
        if self.kind == "raising":
            raise RuntimeError("exporter is broken")
        if self.kind == "blocking":
            self._stop.wait(1.0)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self._stop.set()


def make_provider(kind: str) -> tuple[TracerProvider, Exporter]:
    exporter = Exporter(kind)
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider, exporter


app = worker_app("exporter_faults")
tally = Tally()  # worker side, armed by --worker
work = counting_task(app, TASK, tally)


# -- worker subprocess -------------------------------------------------------------------


def run_worker(kind: str, queue: str, expected: int, report_key: str) -> int:
    from otel_celery_headers import CeleryHeadersInstrumentor

    provider, exporter = make_provider(kind)

    def export_counts() -> dict[str, Any]:
        return {"export_calls": exporter.calls, "spans_to_exporter": exporter.spans}

    tally.expect(expected, report_key, export_counts)
    CeleryHeadersInstrumentor().instrument(tracer_provider=provider, skip_dep_check=True)
    run_solo_worker(app, queue)
    exporter.shutdown()  # ends a blocked export at once
    return 0


# -- driver -----------------------------------------------------------------------------


def one_run(broker: str, client: redis.Redis, kind: str, tasks: int) -> dict[str, float]:
    from otel_celery_headers import CeleryHeadersInstrumentor

    queue = f"bench-faults-{kind}-{uuid.uuid4().hex[:8]}"
    provider, exporter = make_provider(kind)
    instrumentor = CeleryHeadersInstrumentor()
    instrumentor.instrument(tracer_provider=provider, skip_dep_check=True)
    caller = provider.get_tracer("benchmark-caller")
    try:
        with caller.start_as_current_span("caller"):
            start = time.perf_counter()
            for i in range(tasks):
                work.apply_async((i,), queue=queue)
            publish_seconds = time.perf_counter() - start
    finally:
        instrumentor.uninstrument()
        exporter.shutdown()
        provider.shutdown()

    report, _ = drain_queue(client, broker, __file__, ["--exporter", kind], queue, tasks, kind)
    return {
        "publish_per_s": tasks / publish_seconds,
        "worker_per_s": (tasks - 1) / report["seconds"],
        "worker_export_calls": report["export_calls"],
        "worker_spans_to_exporter": report["spans_to_exporter"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=3000, help="tasks per round and variant")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    # Internal: the worker subprocess.
    add_worker_options(parser)
    parser.add_argument("--exporter", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        return run_worker(args.exporter, args.queue, args.expect, args.report_key)

    # The SDK logs the raising exporter's traceback (at most every 20 s): keep the table readable.
    logging.getLogger("opentelemetry.sdk._shared_internal").setLevel(logging.CRITICAL)
    started = time.perf_counter()
    with redis_server() as broker:
        app.conf.broker_url = broker
        client = redis.Redis.from_url(broker)
        for i in range(50):  # warm the publisher's connection pool
            work.apply_async((i,), queue="bench-faults-warmup")
        client.delete("bench-faults-warmup")
        one_run(broker, client, "healthy", max(args.tasks // 5, 10))  # a warm-up round, not counted
        raw = run_rounds(VARIANTS, args.rounds,
                         lambda kind: one_run(broker, client, kind, args.tasks))

    # Paired per round: each faulty exporter's rate relative to the same round's healthy one.
    summary = paired_summary(raw, "healthy")

    elapsed = time.perf_counter() - started
    print(f"\n{args.tasks} tasks x {args.rounds} rounds per exporter, Redis broker, solo worker; "
          f"medians")
    header = (f"{'exporter':<10}{'publish tasks/s':>16}{'vs healthy':>12}"
              f"{'worker tasks/s':>16}{'vs healthy':>12}{'worker exports':>16}"
              f"{'spans exported':>16}")
    print(header)
    print("-" * len(header))
    for kind in VARIANTS:
        row = summary[kind]
        print(f"{kind:<10}{row['publish_per_s']:>16.0f}{row['publish_vs_healthy']:>12.2f}"
              f"{row['worker_per_s']:>16.0f}{row['worker_vs_healthy']:>12.2f}"
              f"{row['worker_export_calls']:>16.0f}"
              f"{row['worker_spans_to_exporter']:>10.0f} of {args.tasks}")
    print(f"\n({elapsed:.0f} s)")
    if args.json:
        write_json(args.json, {
            "benchmark": "exporter_faults", "tasks": args.tasks, "rounds": args.rounds,
            "summary": summary, "rounds_raw": raw, "seconds": elapsed,
        })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
