"""Per-message overhead of tracing Celery, in one process, through Celery's own code.

Publish: ``Task.delay`` under an active span, to the ``memory://`` broker (apply_async
-> send_task -> amqp.send_task_message -> kombu publish). The messages are then taken
back from the memory transport as real kombu Messages (not timed) and executed the
way a worker does: ``celery.worker.request.Request(message, app=app, task=task)
.execute()`` (decoding, header extraction, signals, the task tracer).

The variants (see ``_common.py``) are switched on and off round by round in this
process, in a new (seeded) random order each round; the median over rounds is
reported, and overheads are medians of the per-round differences to ``none``. Times
are CPU time of the process by default (``--clock wall`` for elapsed time), so other
load on the machine disturbs them less. Spans go to a BatchSpanProcessor whose
exporter drops them.

    python benchmarks/overhead.py                     # defaults: < 2 minutes
    python benchmarks/overhead.py --messages 2000 --rounds 15 --json overhead.json
    python benchmarks/overhead.py --variants none,ours --rounds 3   # e.g. under a profiler
    python benchmarks/overhead.py --candidate /tmp/copy/src \
        --variants none,floor,ours,candidate                      # A/B of a change
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    ALL_VARIANTS,
    Telemetry,
    Variant,
    load_candidate,
    median,
    parse_variants,
    register_app,
)
from celery import Celery
from celery.worker.request import Request
from kombu import Queue
from opentelemetry.trace import SpanKind

QUEUE = "bench"

app = Celery("overhead", broker="memory://", set_as_current=False)
app.conf.update(
    task_default_queue=QUEUE,
    task_ignore_result=True,
    broker_connection_retry_on_startup=False,
    worker_hijack_root_logger=False,
)
register_app(app)


@app.task(name="bench.noop")
def noop(x: int) -> int:
    return x


CLOCKS = {
    # CPU time of the whole process (all threads, the BatchSpanProcessor's included):
    # time the process spent descheduled by other load is not counted.
    "cpu": time.process_time,
    "wall": time.perf_counter,
}


class Bench:
    def __init__(self, telemetry: Telemetry, clock: str = "cpu") -> None:
        self.telemetry = telemetry
        self.clock = CLOCKS[clock]
        # The task object itself, as a worker has it (``noop`` is a lazy proxy).
        self.task = app.tasks[noop.name]
        self.caller = telemetry.tracer_provider.get_tracer("benchmark-caller")
        self.connection = app.connection_for_write()
        self.queue = Queue(QUEUE, routing_key=QUEUE)(self.connection.default_channel)
        self.queue.declare()

    def drain(self, count: int) -> list[Any]:
        messages = []
        for _ in range(count):
            message = self.queue.get(no_ack=True)
            if message is None:
                raise RuntimeError(f"expected {count} messages, got {len(messages)}")
            messages.append(message)
        if self.queue.get(no_ack=True) is not None:
            raise RuntimeError("more messages than were published")
        return messages

    def publish(self, count: int) -> float:
        """Seconds to publish ``count`` messages with Task.delay under an active span."""
        delay = self.task.delay
        clock = self.clock
        with self.caller.start_as_current_span("caller"):
            start = clock()
            for i in range(count):
                delay(i)
            return clock() - start

    def execute(self, messages: list[Any]) -> float:
        """Seconds to execute the messages as the worker does."""
        task = self.task
        clock = self.clock
        start = clock()
        for message in messages:
            Request(message, app=app, task=task).execute()
        return clock() - start

    def settle(self) -> None:
        self.telemetry.flush()
        gc.collect()

    def run(self, variant: Variant, count: int) -> tuple[float, float]:
        """(us per publish, us per execution) for one round of one variant."""
        exported = self.telemetry.exporter.exported
        variant.on()
        try:
            self.settle()
            publish = self.publish(count)
            messages = self.drain(count)
            self.settle()
            execute = self.execute(messages)
        finally:
            variant.off()
        self.telemetry.flush()
        spans = self.telemetry.exporter.exported - exported
        expected = 1 + variant.spans_per_message * count  # +1: the caller span
        if spans != expected:
            raise RuntimeError(f"{variant.name}: {spans} spans exported, expected {expected}")
        return publish / count * 1e6, execute / count * 1e6

    def check(self, variant: Variant) -> None:
        """One message, spans kept: the consumer span must be the producer span's child."""
        exporter = self.telemetry.exporter
        exporter.keep = []
        try:
            self.run(variant, 1)
        finally:
            spans, exporter.keep = exporter.keep, None
        if variant.spans_per_message == 0:
            return
        kinds = {s.kind: s for s in spans}
        producer, consumer, caller = (
            kinds.get(SpanKind.PRODUCER),
            kinds.get(SpanKind.CONSUMER),
            kinds.get(SpanKind.INTERNAL),
        )
        if producer is None or consumer is None or caller is None:
            raise RuntimeError(f"{variant.name}: spans {[(s.name, s.kind) for s in spans]}")
        if producer.parent is None or producer.parent.span_id != caller.context.span_id:
            raise RuntimeError(f"{variant.name}: the producer span is not the caller's child")
        if consumer.parent is None or consumer.parent.span_id != producer.context.span_id:
            raise RuntimeError(f"{variant.name}: the consumer span is not the producer's child")


def _versions() -> dict[str, str]:
    found = {}
    for dist in ("celery", "kombu", "opentelemetry-api", "opentelemetry-sdk",
                 "opentelemetry-instrumentation-celery", "otel-celery-headers", "wrapt"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return found


def iqr(values: list[float]) -> float:
    """Interquartile range: the spread of the middle half of the rounds."""
    ordered = sorted(values)
    if len(ordered) < 4:
        return ordered[-1] - ordered[0] if ordered else float("nan")
    q = len(ordered) / 4
    return ordered[int(3 * q)] - ordered[int(q)]


def summarize(names: list[str], raw: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    base = raw.get("none")
    for name in names:
        row: dict[str, Any] = {}
        for side in ("publish", "execute"):
            values = raw[name][side]
            row[f"{side}_us"] = median(values)
            if base is not None:
                # Paired per round: each round's variant minus the same round's "none".
                diffs = [v - b for v, b in zip(values, base[side])]
                row[f"{side}_overhead_us"] = median(diffs)
                row[f"{side}_overhead_iqr_us"] = iqr(diffs)
        summary[name] = row
    for name in names:
        row = summary[name]
        for ref in ("floor", "floor_attributes", "official"):
            if ref in summary and name not in (ref, "none") and "publish_overhead_us" in row:
                for side in ("publish", "execute"):
                    denominator = summary[ref][f"{side}_overhead_us"]
                    row[f"{side}_ratio_to_{ref}"] = (
                        row[f"{side}_overhead_us"] / denominator if denominator > 0 else None
                    )
    return summary


def print_table(names: list[str], summary: dict[str, Any]) -> None:
    def ratio(value: float | None) -> str:
        return "" if value is None else f"{value:.2f}x"

    header = (
        f"{'variant':<17}{'us/publish':>11}{'overhead':>10}{'IQR':>6}{'us/execute':>12}"
        f"{'overhead':>10}{'IQR':>6}"
        f"{'pub/floor':>11}{'exe/floor':>11}{'pub/official':>14}{'exe/official':>14}"
    )
    print(header)
    print("-" * len(header))
    for name in names:
        row = summary[name]
        po = row.get("publish_overhead_us")
        eo = row.get("execute_overhead_us")
        pi = row.get("publish_overhead_iqr_us")
        ei = row.get("execute_overhead_iqr_us")
        print(
            f"{name:<17}{row['publish_us']:>11.1f}"
            f"{'' if po is None else f'{po:+.1f}':>10}"
            f"{'' if pi is None or name == 'none' else f'{pi:.1f}':>6}"
            f"{row['execute_us']:>12.1f}"
            f"{'' if eo is None else f'{eo:+.1f}':>10}"
            f"{'' if ei is None or name == 'none' else f'{ei:.1f}':>6}"
            f"{ratio(row.get('publish_ratio_to_floor')):>11}"
            f"{ratio(row.get('execute_ratio_to_floor')):>11}"
            f"{ratio(row.get('publish_ratio_to_official')):>14}"
            f"{ratio(row.get('execute_ratio_to_official')):>14}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=500, help="messages per round and variant")
    parser.add_argument("--rounds", type=int, default=40, help="measured rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="unreported rounds first")
    parser.add_argument(
        "--variants",
        help=f"comma-separated, from {', '.join(ALL_VARIANTS)} (default: all but official_metrics)",
    )
    parser.add_argument("--json", type=Path, help="write the figures and raw rounds here")
    parser.add_argument(
        "--candidate",
        type=Path,
        metavar="SRC_DIR",
        help="another copy of the package (SRC_DIR/otel_celery_headers), measured as the "
        "'candidate' and 'candidate_metrics' variants beside 'ours' (A/B of a change)",
    )
    parser.add_argument("--quiet", action="store_true", help="no per-round lines")
    parser.add_argument("--seed", type=int, default=1, help="seed of the per-round variant order")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="cpu",
        help="cpu: CPU time of this process (default; robust to other load on the "
        "machine); wall: elapsed time",
    )
    args = parser.parse_args(argv)

    if args.candidate is not None:
        load_candidate(args.candidate)
    names = parse_variants(args.variants)
    load_before = os.getloadavg()[0]
    telemetry = Telemetry()
    variants = [Variant(name, telemetry) for name in names]
    bench = Bench(telemetry, args.clock)
    started = time.perf_counter()

    for variant in variants:
        bench.check(variant)

    raw: dict[str, dict[str, list[float]]] = {n: {"publish": [], "execute": []} for n in names}
    shuffler = random.Random(args.seed)
    total = args.warmup + args.rounds
    for round_no in range(total):
        # A new order every round (seeded: reproducible), so no variant always runs
        # first, last, or right after the same other variant.
        order = list(variants)
        shuffler.shuffle(order)
        line = []
        for variant in order:
            publish, execute = bench.run(variant, args.messages)
            if round_no >= args.warmup:
                raw[variant.name]["publish"].append(publish)
                raw[variant.name]["execute"].append(execute)
            line.append(f"{variant.name} {publish:.0f}/{execute:.0f}")
        if not args.quiet:
            tag = "warmup" if round_no < args.warmup else f"round {round_no - args.warmup + 1}"
            print(f"{tag:>9}: " + "  ".join(line) + "  (us publish/execute)", flush=True)

    summary = summarize(names, raw)
    elapsed = time.perf_counter() - started
    print()
    print(
        f"{args.messages} messages x {args.rounds} rounds per variant; median us ({args.clock} "
        f"time) per message; overhead = median of per-round differences to 'none'"
    )
    print_table(names, summary)
    if "floor_attributes" in summary:
        for name in names:
            row = summary[name]
            if row.get("publish_ratio_to_floor_attributes") is not None:
                print(
                    f"{name} / floor_attributes: publish "
                    f"{row['publish_ratio_to_floor_attributes']:.2f}x, execute "
                    f"{row['execute_ratio_to_floor_attributes']:.2f}x"
                )
    for a, b in (("candidate", "ours"), ("candidate_metrics", "ours_metrics")):
        if a in raw and b in raw:
            diffs = {
                side: [x - y for x, y in zip(raw[a][side], raw[b][side])]
                for side in ("publish", "execute")
            }
            deltas = {side: median(d) for side, d in diffs.items()}
            summary[a]["minus_" + b] = deltas
            print(
                f"{a} - {b} (median of per-round differences, IQR): "
                f"publish {deltas['publish']:+.1f} us ({iqr(diffs['publish']):.1f}), "
                f"execute {deltas['execute']:+.1f} us ({iqr(diffs['execute']):.1f})"
            )
    load_after = os.getloadavg()[0]
    print(f"\n({elapsed:.0f} s; load average {load_before:.2f} before, {load_after:.2f} after, "
          f"{os.cpu_count()} CPUs)")
    if max(load_before, load_after) > 1.5:
        print("note: other processes were using the CPU; the figures are noisier than usual")

    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "benchmark": "overhead",
                    "messages": args.messages,
                    "rounds": args.rounds,
                    "warmup": args.warmup,
                    "clock": args.clock,
                    "variants": names,
                    "summary": summary,
                    "rounds_us": raw,
                    "seconds": elapsed,
                    "load_average": [load_before, load_after],
                    "python": sys.version.split()[0],
                    "platform": platform.platform(),
                    "versions": _versions(),
                },
                indent=2,
            )
            + "\n"
        )
        print(f"wrote {args.json}")
    telemetry.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
