"""Tasks per second through a real Redis broker and a Celery worker, per variant and pool.

For each pool (``solo``; ``prefork`` with two children), round and variant (order
rotating from round to round):

1. this process, instrumented with the variant, publishes N tasks with
   ``apply_async`` under an active span to a fresh queue on a throwaway
   ``redis-server`` (publish rate: tasks/s on the client);
2. a worker subprocess (``celery worker -P solo``, or ``-P prefork -c 2``),
   instrumented with the same variant, then drains that queue (worker rate: tasks/s
   from the start of the first task to the end of the last one, so the worker's
   start-up is not counted; a prefork pool's children count in shared memory).
   The prefork worker's SDK MeterProvider also collects and exports (to nowhere)
   every second, as a production one does, so collection is part of its cost; its
   main process, one thread for all deliveries, is where the delivery metrics are
   recorded (issue 18's target: traces and metrics >= 0.95x the uninstrumented rate).

The queue is filled before the worker starts, so the two sides are measured apart
and do not compete for the CPU. Spans go to a BatchSpanProcessor whose exporter drops
them, in both processes. Medians over rounds are reported.

    python benchmarks/end_to_end.py                          # about 4 minutes
    python benchmarks/end_to_end.py --tasks 5000 --rounds 5 --json e2e.json
    python benchmarks/end_to_end.py --pools solo --variants none,floor,official,ours,ours_metrics
    python benchmarks/end_to_end.py --pools prefork --prefork-variants none,ours,ours_metrics
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import redis
from _common import (
    ALL_VARIANTS,
    Tally,
    Telemetry,
    Variant,
    add_worker_options,
    counting_task,
    drain_queue,
    paired_summary,
    parse_variants,
    SharedCountingExporter,
    redis_server,
    register_app,
    run_rounds,
    run_solo_worker,
    worker_app,
    write_json,
)

DEFAULT_VARIANTS = ("none", "official", "ours")
DEFAULT_PREFORK_VARIANTS = ("none", "ours", "ours_metrics")
PREFORK_CONCURRENCY = 2
TASK = "bench.e2e"

app = worker_app("end_to_end")
register_app(app)
tally = Tally()  # worker side, armed by --worker
e2e = counting_task(app, TASK, tally)


# -- worker subprocess -------------------------------------------------------------------


def run_worker(variant_name: str, queue: str, expected: int, report_key: str, pool: str) -> int:
    prefork = pool == "prefork"
    telemetry = (Telemetry(exporter=SharedCountingExporter(), metric_export_ms=1000) if prefork
                 else Telemetry())

    def spans() -> dict[str, Any]:
        telemetry.flush()
        if prefork and variant_name != "none":
            # The other child exports its last spans within its flush interval (after
            # the clock stopped): wait for them, briefly.
            deadline = time.monotonic() + 5
            while telemetry.exporter.exported < expected and time.monotonic() < deadline:
                time.sleep(0.05)
        return {"spans": telemetry.exporter.exported}

    tally.expect(expected, report_key, spans)
    if prefork:
        tally.share()
    Variant(variant_name, telemetry).on()
    run_solo_worker(app, queue, pool, PREFORK_CONCURRENCY if prefork else 1)
    return 0


# -- driver -----------------------------------------------------------------------------


def one_run(broker: str, client: redis.Redis, telemetry: Telemetry, variant: Variant,
            tasks: int, caller: Any, pool: str) -> dict[str, float]:
    queue = f"bench-{variant.name}-{uuid.uuid4().hex[:8]}"
    variant.on()
    try:
        with caller.start_as_current_span("caller"):
            start = time.perf_counter()
            apply_async = app.tasks[TASK].apply_async  # the task itself, not the lazy proxy
            for i in range(tasks):
                apply_async((i,), queue=queue)
            publish_seconds = time.perf_counter() - start
    finally:
        variant.off()
    telemetry.flush()

    report, err = drain_queue(client, broker, __file__, ["--variant", variant.name, "--pool", pool],
                              queue, tasks, f"{variant.name} ({pool})")
    if variant.spans_per_message and report["spans"] < tasks - 1:
        raise RuntimeError(f"{variant.name}: worker exported {report['spans']} spans\n{err}")
    return {
        "publish_per_s": tasks / publish_seconds,
        # From the start of the first task to the end of the last: tasks - 1 gaps.
        "worker_per_s": (tasks - 1) / report["seconds"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=2000, help="tasks per round and variant")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variants", help=f"comma-separated, from {', '.join(ALL_VARIANTS)} "
                        f"(default: {','.join(DEFAULT_VARIANTS)})")
    parser.add_argument("--prefork-variants", help="the variants of the prefork rounds "
                        f"(default: {','.join(DEFAULT_PREFORK_VARIANTS)})")
    parser.add_argument("--pools", default="solo,prefork", help="solo, prefork or both")
    parser.add_argument("--json", type=Path)
    # Internal: the worker subprocess.
    add_worker_options(parser)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--pool", default="solo", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        return run_worker(args.variant, args.queue, args.expect, args.report_key, args.pool)

    pools = [p.strip() for p in args.pools.split(",") if p.strip()]
    if not pools or any(p not in ("solo", "prefork") for p in pools):
        raise SystemExit(f"--pools takes solo and/or prefork, not {args.pools!r}")
    variants_of = {"solo": parse_variants(args.variants, DEFAULT_VARIANTS),
                   "prefork": parse_variants(args.prefork_variants, DEFAULT_PREFORK_VARIANTS)}
    started = time.perf_counter()
    results: dict[str, Any] = {}
    with redis_server() as broker:
        app.conf.broker_url = broker
        client = redis.Redis.from_url(broker)
        telemetry = Telemetry()
        caller = telemetry.tracer_provider.get_tracer("benchmark-caller")
        # Warm the publisher's connection pool before anything is timed.
        for i in range(50):
            e2e.apply_async((i,), queue="bench-warmup")
        client.delete("bench-warmup")
        for pool in pools:
            names = variants_of[pool]
            if "none" not in names:
                raise SystemExit(f"the {pool} variants need 'none', the baseline of every ratio")
            variants = {n: Variant(n, telemetry) for n in names}
            print(f"{pool} worker:")
            raw = run_rounds(names, args.rounds, lambda name: one_run(
                broker, client, telemetry, variants[name], args.tasks, caller, pool))
            # Paired per round: each variant's rate relative to the same round's "none".
            results[pool] = {"variants": names, "summary": paired_summary(raw, "none"),
                             "rounds_per_s": raw}
        telemetry.shutdown()

    elapsed = time.perf_counter() - started
    for pool in pools:
        names, summary = results[pool]["variants"], results[pool]["summary"]
        where = ("solo worker" if pool == "solo"
                 else f"prefork worker (-c {PREFORK_CONCURRENCY}, metrics exported every 1 s)")
        print(f"\n{args.tasks} tasks x {args.rounds} rounds per variant, Redis broker, {where}; "
              f"medians")
        header = f"{'variant':<17}{'publish tasks/s':>16}{'vs none':>9}{'worker tasks/s':>16}{'vs none':>9}"
        print(header)
        print("-" * len(header))
        for name in names:
            row = summary[name]
            pv = row.get("publish_vs_none")
            wv = row.get("worker_vs_none")
            print(f"{name:<17}{row['publish_per_s']:>16.0f}{'' if pv is None else f'{pv:.2f}':>9}"
                  f"{row['worker_per_s']:>16.0f}{'' if wv is None else f'{wv:.2f}':>9}")
    if "prefork" in results and "ours_metrics" in results["prefork"]["summary"]:
        ratio = results["prefork"]["summary"]["ours_metrics"].get("worker_vs_none")
        if ratio is not None:
            print(f"\ntarget (issue 18): prefork worker with traces and metrics / uninstrumented "
                  f">= 0.95x: {ratio:.2f}x {'met' if ratio >= 0.95 else 'NOT met'}")
    print(f"\n({elapsed:.0f} s)")
    if args.json:
        write_json(args.json, {
            "benchmark": "end_to_end", "tasks": args.tasks, "rounds": args.rounds,
            "pools": results, "seconds": elapsed,
        })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
