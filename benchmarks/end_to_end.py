"""Tasks per second through a real Redis broker and a solo Celery worker, per variant.

For each round and variant (order rotating from round to round):

1. this process, instrumented with the variant, publishes N tasks with
   ``apply_async`` under an active span to a fresh queue on a throwaway
   ``redis-server`` (publish rate: tasks/s on the client);
2. a worker subprocess (``celery worker -P solo``), instrumented with the same
   variant, then drains that queue (worker rate: tasks/s from the start of the first
   task to the end of the last one, so the worker's start-up is not counted).

The queue is filled before the worker starts, so the two sides are measured apart
and do not compete for the CPU. Spans go to a BatchSpanProcessor whose exporter drops
them, in both processes. Medians over rounds are reported.

    python benchmarks/end_to_end.py                          # < 2 minutes
    python benchmarks/end_to_end.py --tasks 5000 --rounds 5 --json e2e.json
    python benchmarks/end_to_end.py --variants none,floor,official,ours,ours_metrics
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
    redis_server,
    register_app,
    run_rounds,
    run_solo_worker,
    worker_app,
    write_json,
)

DEFAULT_VARIANTS = ("none", "official", "ours")
TASK = "bench.e2e"

app = worker_app("end_to_end")
register_app(app)
tally = Tally()  # worker side, armed by --worker
e2e = counting_task(app, TASK, tally)


# -- worker subprocess -------------------------------------------------------------------


def run_worker(variant_name: str, queue: str, expected: int, report_key: str) -> int:
    telemetry = Telemetry()

    def spans() -> dict[str, Any]:
        telemetry.flush()
        return {"spans": telemetry.exporter.exported}

    tally.expect(expected, report_key, spans)
    Variant(variant_name, telemetry).on()
    run_solo_worker(app, queue)
    return 0


# -- driver -----------------------------------------------------------------------------


def one_run(broker: str, client: redis.Redis, telemetry: Telemetry, variant: Variant,
            tasks: int, caller: Any) -> dict[str, float]:
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

    report, err = drain_queue(client, broker, __file__, ["--variant", variant.name], queue,
                              tasks, variant.name)
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
    parser.add_argument("--json", type=Path)
    # Internal: the worker subprocess.
    add_worker_options(parser)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        return run_worker(args.variant, args.queue, args.expect, args.report_key)

    names = parse_variants(args.variants, DEFAULT_VARIANTS)
    started = time.perf_counter()
    with redis_server() as broker:
        app.conf.broker_url = broker
        client = redis.Redis.from_url(broker)
        telemetry = Telemetry()
        caller = telemetry.tracer_provider.get_tracer("benchmark-caller")
        variants = {n: Variant(n, telemetry) for n in names}
        # Warm the publisher's connection pool before anything is timed.
        for i in range(50):
            e2e.apply_async((i,), queue="bench-warmup")
        client.delete("bench-warmup")

        raw = run_rounds(names, args.rounds, lambda name: one_run(
            broker, client, telemetry, variants[name], args.tasks, caller))
        telemetry.shutdown()

    # Paired per round: each variant's rate relative to the same round's "none".
    summary = paired_summary(raw, "none")

    elapsed = time.perf_counter() - started
    print(f"\n{args.tasks} tasks x {args.rounds} rounds per variant, Redis broker, solo worker; "
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
    print(f"\n({elapsed:.0f} s)")
    if args.json:
        write_json(args.json, {
            "benchmark": "end_to_end", "tasks": args.tasks, "rounds": args.rounds,
            "variants": names, "summary": summary, "rounds_per_s": raw, "seconds": elapsed,
        })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
