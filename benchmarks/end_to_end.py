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
import json
import os
import platform
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import redis
from _common import (
    ALL_VARIANTS,
    Telemetry,
    Variant,
    median,
    parse_variants,
    redis_server,
    register_app,
)
from celery import Celery

DEFAULT_VARIANTS = ("none", "official", "ours")
TASK = "bench.e2e"

app = Celery("end_to_end", broker=os.environ.get("BENCH_BROKER_URL", "memory://"),
             set_as_current=False)
app.conf.update(
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    worker_redirect_stdouts=False,
    worker_prefetch_multiplier=16,
)
register_app(app)

# Worker-side bookkeeping, filled in by --worker.
_expected = 0
_done = 0
_first = 0.0
_report_key = ""
_telemetry: Telemetry | None = None


@app.task(name=TASK)
def e2e(i: int) -> int:
    global _done, _first
    if _done == 0:
        _first = time.perf_counter()
    _done += 1
    if _done == _expected:
        seconds = time.perf_counter() - _first
        spans = 0
        if _telemetry is not None:
            _telemetry.flush()
            spans = _telemetry.exporter.exported
        client = redis.Redis.from_url(app.conf.broker_url)
        client.rpush(_report_key, json.dumps({"tasks": _done, "seconds": seconds, "spans": spans}))
    return i


# -- worker subprocess -------------------------------------------------------------------


def run_worker(variant_name: str, queue: str, expected: int, report_key: str) -> int:
    global _expected, _report_key, _telemetry
    _expected = expected
    _report_key = report_key
    _telemetry = Telemetry()
    Variant(variant_name, _telemetry).on()
    app.worker_main([
        "worker", "--pool", "solo", "--concurrency", "1", "--queues", queue,
        "--without-gossip", "--without-mingle", "--without-heartbeat",
        "--loglevel", "WARNING", "--hostname", f"{queue}@localhost",
    ])
    return 0


# -- driver -----------------------------------------------------------------------------


def _worker(broker: str, variant: str, queue: str, expected: int, report_key: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, BENCH_BROKER_URL=broker, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--worker", "--variant", variant,
         "--queue", queue, "--expect", str(expected), "--report-key", report_key],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _stop(proc: subprocess.Popen[bytes]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # warm shutdown
    try:
        _, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err.decode(errors="replace")


def one_run(broker: str, client: redis.Redis, telemetry: Telemetry, variant: Variant,
            tasks: int, caller: Any) -> dict[str, float]:
    queue = f"bench-{variant.name}-{uuid.uuid4().hex[:8]}"
    report_key = f"bench:report:{queue}"
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
    queued = client.llen(queue)
    if queued != tasks:
        raise RuntimeError(f"{queued} messages in {queue}, expected {tasks}")

    proc = _worker(broker, variant.name, queue, tasks, report_key)
    try:
        # Short waits: redis-py 8's default socket timeout (5 s) cuts a long BLPOP.
        reply = None
        deadline = time.monotonic() + 120
        while reply is None and time.monotonic() < deadline:
            exited = proc.poll() is not None
            reply = client.blpop([report_key], timeout=1)
            if exited:
                break
        if reply is None:
            raise RuntimeError(f"worker for {variant.name} did not finish:\n{_stop(proc)}")
    finally:
        err = _stop(proc)
    report = json.loads(reply[1])
    if variant.spans_per_message and report["spans"] < tasks - 1:
        raise RuntimeError(f"{variant.name}: worker exported {report['spans']} spans\n{err}")
    if report["tasks"] != tasks:
        raise RuntimeError(f"{variant.name}: worker ran {report['tasks']} tasks\n{err}")
    client.delete(queue, report_key)
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
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--queue", help=argparse.SUPPRESS)
    parser.add_argument("--expect", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--report-key", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        return run_worker(args.variant, args.queue, args.expect, args.report_key)

    names = parse_variants(args.variants, DEFAULT_VARIANTS)
    started = time.perf_counter()
    raw: dict[str, dict[str, list[float]]] = {n: {"publish_per_s": [], "worker_per_s": []}
                                              for n in names}
    with redis_server() as broker:
        app.conf.broker_url = broker
        client = redis.Redis.from_url(broker)
        telemetry = Telemetry()
        caller = telemetry.tracer_provider.get_tracer("benchmark-caller")
        variants = [Variant(n, telemetry) for n in names]
        # Warm the publisher's connection pool before anything is timed.
        for i in range(50):
            e2e.apply_async((i,), queue="bench-warmup")
        client.delete("bench-warmup")

        for round_no in range(args.rounds):
            shift = round_no % len(variants)
            line = []
            for variant in variants[shift:] + variants[:shift]:
                result = one_run(broker, client, telemetry, variant, args.tasks, caller)
                for key, value in result.items():
                    raw[variant.name][key].append(value)
                line.append(f"{variant.name} {result['publish_per_s']:.0f}/"
                            f"{result['worker_per_s']:.0f}")
            print(f"round {round_no + 1}: " + "  ".join(line) + "  (tasks/s publish/worker)",
                  flush=True)
        telemetry.shutdown()

    summary: dict[str, Any] = {}
    base = raw.get("none")
    for name in names:
        row: dict[str, Any] = {k: median(v) for k, v in raw[name].items()}
        if base is not None:
            for key in ("publish_per_s", "worker_per_s"):
                # Paired per round: this variant's rate relative to the same round's "none".
                row[key.replace("per_s", "vs_none")] = median(
                    [v / b for v, b in zip(raw[name][key], base[key])])
        summary[name] = row

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
        args.json.write_text(json.dumps({
            "benchmark": "end_to_end", "tasks": args.tasks, "rounds": args.rounds,
            "variants": names, "summary": summary, "rounds_per_s": raw, "seconds": elapsed,
            "python": sys.version.split()[0], "platform": platform.platform(),
        }, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
