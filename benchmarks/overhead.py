"""Per-message overhead of tracing Celery, in one process, through Celery's own code.

Publish: ``Task.delay`` under an active span, to the ``memory://`` broker (apply_async
-> send_task -> amqp.send_task_message -> kombu publish). The messages are then taken
back from the memory transport as real kombu Messages (not timed) and executed the
way a worker does: ``celery.worker.request.Request(message, app=app, task=task)
.execute()`` (decoding, header extraction, signals, the task tracer).

The variants (see ``_common.py``) are switched on and off round by round in this
process, in a new (seeded) random order each round, so drift and other load hit them
alike. Every round gives each variant's overhead (its time minus the same round's
``none``) and, for each pair compared, the ratio of two overheads from that same
round; the figures are medians over rounds, with the IQR of the per-round values and
a bootstrap 95% confidence interval of the median. Times are CPU time of the
measuring thread by default (``--clock thread``): time spent descheduled by other
load is not counted, nor the BatchSpanProcessor's thread. The garbage collector is
paused inside the timed loops (and run between them), so a collection does not land
in one variant's loop by chance.

The ratios of the targets (issue 12) are printed together, from one run: the
unsampled ones from variants run with a ``ParentBased(ALWAYS_OFF)`` sampler
(``ours@parent_off``, ``floor@parent_off``), the sampled ones from ``always_on``.

    python benchmarks/overhead.py                     # all targets: about 3 minutes
    python benchmarks/overhead.py --rounds 60 --json overhead.json
    python benchmarks/overhead.py --sampler ratio:0.01 --variants none,floor,ours
    python benchmarks/overhead.py --variants none,ours --rounds 3   # e.g. under a profiler
    python benchmarks/overhead.py --candidate /tmp/copy/src \
        --variants none,ours,candidate                             # A/B of a change
    python benchmarks/overhead.py --main-process-callbacks   # also Request.on_accepted
                                                             # and on_success, as the
                                                             # worker's main process calls them
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import gc
import itertools
import json
import os
import platform
import random
import re
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    ALL_VARIANTS,
    SAMPLERS,
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
    # CPU time of this (the measuring) thread: time descheduled by other load is not
    # counted, nor the BatchSpanProcessor's export thread (its exporter drops spans).
    "thread": time.thread_time,
    # CPU time of the whole process, all threads.
    "cpu": time.process_time,
    "wall": time.perf_counter,
}

# The pairs whose ratio of overheads is reported, and the targets of issue 12:
# (numerator, denominator, target or None, what it says).
TARGETS = (
    ("ours@parent_off", "floor@parent_off", 1.25, "unsampled: ours / floor"),
    ("ours", "floor_attributes", 1.15, "sampled: ours / floor with the same attributes"),
    ("ours", "official", 0.80, "sampled: ours / opentelemetry-instrumentation-celery"),
    ("ours", "floor", None, "sampled: ours / bare floor"),
    ("floor_attributes", "floor", None, "sampled: the attributes alone, in the SDK"),
    ("official@parent_off", "floor@parent_off", None, "unsampled: official / floor"),
    ("candidate", "ours", None, "A/B: candidate / ours"),
    ("candidate@parent_off", "ours@parent_off", None, "A/B unsampled: candidate / ours"),
)
# Per-message cost of the metrics in the task's process: the same instrumentation
# with and without an SDK MeterProvider, paired per round.
METRIC_PAIRS = (("ours_metrics", "ours"), ("official_metrics", "official"),
                ("candidate_metrics", "candidate"))
DEFAULT_VARIANTS = ("none", "floor", "floor_attributes", "official", "ours", "ours_metrics",
                    "floor@parent_off", "ours@parent_off")


class Bench:
    def __init__(self, telemetry: Telemetry, clock: str = "thread",
                 main_process_callbacks: bool = False) -> None:
        self.telemetry = telemetry
        self.clock = CLOCKS[clock]
        self.main_process_callbacks = main_process_callbacks
        # The task object itself, as a worker has it (``noop`` is a lazy proxy).
        self.task = app.tasks[noop.name]
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

    def publish(self, count: int, variant: Variant | None = None) -> float:
        """Seconds to publish ``count`` messages with Task.delay.

        Under one active ``caller`` span from the variant's TracerProvider (so its
        sampler decides for the whole round), except with a ``ratio:`` sampler: there
        each message is its own root, sampled or not by its trace id.
        """
        delay = self.task.delay
        clock = self.clock
        sampler = self.telemetry.sampler if variant is None else variant.sampler
        if sampler.startswith("ratio:"):
            caller: Any = contextlib.nullcontext()
        else:
            caller = self.telemetry.provider(sampler).get_tracer(
                "benchmark-caller").start_as_current_span("caller")
        with caller:
            gc.disable()
            try:
                start = clock()
                for i in range(count):
                    delay(i)
                return clock() - start
            finally:
                gc.enable()

    def execute_one(self, message: Any) -> Any:
        """One message as the worker executes it; with ``main_process_callbacks``, also
        what the worker's main process adds around it: the pool accepts it
        (Request.on_accepted), the result comes back (Request.on_success). Here the
        pool is this very thread."""
        request = Request(message, app=app, task=self.task)
        if not self.main_process_callbacks:
            return request.execute()
        request.on_accepted(os.getpid(), time.monotonic())
        retval = request.execute()
        request.on_success((False, retval, 0.0))
        return retval

    def execute(self, messages: list[Any]) -> float:
        """Seconds to execute the messages as the worker does."""
        task = self.task
        clock = self.clock
        gc.disable()
        try:
            if self.main_process_callbacks:
                execute_one = self.execute_one
                start = clock()
                for message in messages:
                    execute_one(message)
                return clock() - start
            start = clock()
            for message in messages:
                Request(message, app=app, task=task).execute()
            return clock() - start
        finally:
            gc.enable()

    def settle(self) -> None:
        self.telemetry.flush()
        gc.collect()

    def run(self, variant: Variant, count: int,
            keep: list[Any] | None = None) -> tuple[float, float]:
        """(us per publish, us per execution) for one round of one variant."""
        exported = self.telemetry.exporter.exported
        variant.on()
        try:
            self.settle()
            publish = self.publish(count, variant)
            messages = self.drain(count)
            if keep is not None:
                keep.extend(messages)
            self.settle()
            execute = self.execute(messages)
        finally:
            variant.off()
        self.telemetry.flush()
        spans = self.telemetry.exporter.exported - exported
        expected = 1 + variant.spans_per_message * count  # +1: the caller span
        if variant.sampler == "parent_off":
            expected = 0
        if variant.sampler.startswith("ratio:"):
            if not 0 <= spans <= variant.spans_per_message * count:
                raise RuntimeError(f"{variant.name}: {spans} spans exported")
        elif spans != expected:
            raise RuntimeError(f"{variant.name}: {spans} spans exported, expected {expected}")
        return publish / count * 1e6, execute / count * 1e6

    def check(self, variant: Variant) -> set[str] | None:
        """One message: the context must reach the task; its spans, if recorded, nest.

        Returns the attribute names of the variant's two spans (None when unsampled).
        """
        exporter = self.telemetry.exporter
        exporter.keep = []
        messages: list[Any] = []
        try:
            self.run(variant, 1, keep=messages)
        finally:
            spans, exporter.keep = exporter.keep, None
        if variant.spans_per_message == 0:
            return None
        traceparent = str(messages[0].headers.get("traceparent") or "")
        if traceparent.count("-") != 3:
            raise RuntimeError(f"{variant.name}: no traceparent in {messages[0].headers}")
        if variant.sampler != "always_on":
            sampled = int(traceparent.rsplit("-", 1)[-1], 16) & 0x01
            if variant.sampler == "parent_off" and sampled:
                raise RuntimeError(f"{variant.name}: sampled traceparent {traceparent}")
            return None
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
        return {f"send {k}" for k in producer.attributes or {}} | {
            f"process {k}" for k in consumer.attributes or {}}


def _versions() -> dict[str, str]:
    found = {}
    for dist in ("celery", "kombu", "opentelemetry-api", "opentelemetry-sdk",
                 "opentelemetry-instrumentation-celery", "otel-celery-headers", "wrapt"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return found


def quantile(ordered: list[float], q: float) -> float:
    """Linear-interpolated quantile of sorted values."""
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def iqr(values: list[float]) -> float:
    """Interquartile range: the spread of the middle half of the rounds."""
    ordered = sorted(values)
    return quantile(ordered, 0.75) - quantile(ordered, 0.25)


def bootstrap_ci(
    rounds: int, estimate: Callable[[list[int]], float], seed: int = 0, resamples: int = 2000
) -> tuple[float, float]:
    """95% confidence interval of ``estimate`` by resampling whole rounds (percentile method).

    ``estimate`` gets the indices of the rounds drawn; resampling rounds, not values,
    keeps the pairing of the variants measured in the same round.
    """
    if rounds < 2:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    everything = range(rounds)
    estimates = sorted(estimate(rng.choices(everything, k=rounds)) for _ in range(resamples))
    return quantile(estimates, 0.025), quantile(estimates, 0.975)


def stats(values: list[float]) -> dict[str, Any]:
    low, high = bootstrap_ci(len(values), lambda drawn: median([values[i] for i in drawn]))
    return {"median": median(values), "iqr": iqr(values), "ci95": [low, high]}


def ratio_stats(numerator: list[float], denominator: list[float]) -> dict[str, Any]:
    """Ratio of two variants' overheads: median of one over median of the other.

    Each overhead is already paired with its own round's ``none``. A ratio of medians,
    not the median of per-round ratios: a round whose small denominator happens to
    be noisy would swing its ratio far more than it moves a median. The IQR is that
    of the per-round ratios (the round-to-round spread); the CI resamples rounds.
    """

    def estimate(drawn: list[int]) -> float:
        den = median([denominator[i] for i in drawn])
        return median([numerator[i] for i in drawn]) / den if den > 0 else float("inf")

    per_round = [a / b if b > 0 else float("inf") for a, b in zip(numerator, denominator)]
    low, high = bootstrap_ci(len(numerator), estimate)
    return {
        "median": estimate(list(range(len(numerator)))),
        "median_of_round_ratios": median(per_round),
        "iqr": iqr(per_round),
        "ci95": [low, high],
    }


def summarize(names: list[str], raw: dict[str, dict[str, list[float]]],
              sampler: str = "always_on") -> dict[str, Any]:
    """Per variant: median time, per-round overheads; per pair: ratio of overheads.

    ``sampler`` is that of the variants named without ``@``: the sampled targets hold
    for ``always_on`` only.
    """
    summary: dict[str, Any] = {"variants": {}, "ratios": {}, "metrics": {}}
    base = raw.get("none")
    overheads: dict[str, dict[str, list[float]]] = {}
    for name in names:
        row: dict[str, Any] = {}
        for side in ("publish", "execute"):
            values = raw[name][side]
            row[f"{side}_us"] = median(values)
            if base is not None and name != "none":
                # Paired per round: each round's variant minus the same round's "none".
                diffs = [v - b for v, b in zip(values, base[side])]
                overheads.setdefault(name, {})[side] = diffs
                row[f"{side}_overhead"] = stats(diffs)
        summary["variants"][name] = row
    for numerator, denominator, target, label in TARGETS:
        if numerator not in overheads or denominator not in overheads:
            continue
        if sampler != "always_on" and "@" not in numerator + denominator:
            label = label.replace("sampled", f"sampler {sampler}")
            target = None
        entry: dict[str, Any] = {"label": label, "target": target}
        for side in ("publish", "execute"):
            entry[side] = ratio_stats(overheads[numerator][side], overheads[denominator][side])
        summary["ratios"][f"{numerator} / {denominator}"] = entry
    for with_metrics, without in METRIC_PAIRS:
        if with_metrics in raw and without in raw:
            summary["metrics"][with_metrics] = {
                side: stats([a - b for a, b in zip(raw[with_metrics][side], raw[without][side])])
                for side in ("publish", "execute")
            }
    return summary


def _ci(entry: dict[str, Any], fmt: str) -> str:
    low, high = entry["ci95"]
    return f"[{low:{fmt}}, {high:{fmt}}]"


def print_summary(names: list[str], summary: dict[str, Any],
                  main_process_callbacks: bool = False) -> None:
    header = (f"{'variant':<22}{'us/publish':>11}{'overhead':>10}{'IQR':>7}"
              f"{'us/execute':>12}{'overhead':>10}{'IQR':>7}")
    print(header)
    print("-" * len(header))
    for name in names:
        row = summary["variants"][name]
        cells = [f"{name:<22}"]
        for side in ("publish", "execute"):
            overhead = row.get(f"{side}_overhead")
            cells.append(f"{row[f'{side}_us']:>{11 if side == 'publish' else 12}.1f}")
            cells.append(f"{'' if overhead is None else format(overhead['median'], '+.1f'):>10}")
            cells.append(f"{'' if overhead is None else format(overhead['iqr'], '.1f'):>7}")
        print("".join(cells))

    if summary["ratios"]:
        print("\nratios of overheads (median over median) [bootstrap 95% CI] +-CI half-width "
              "(IQR of the per-round ratios)")
        header = f"{'pair':<40}{'publish':>32}{'execute':>32}{'target':>9}  met"
        print(header)
        print("-" * len(header))
        for pair, entry in summary["ratios"].items():
            cells = []
            met = []
            for side in ("publish", "execute"):
                s = entry[side]
                low, high = s["ci95"]
                half = (high - low) / 2 / s["median"] if s["median"] else float("nan")
                cells.append(f"{s['median']:.2f}x [{low:.2f}, {high:.2f}] +-{half:.0%} "
                             f"({s['iqr']:.2f})")
                if entry["target"] is not None:
                    met.append(s["median"] <= entry["target"])
            target = "" if entry["target"] is None else f"<={entry['target']:.2f}"
            verdict = "" if not met else ("yes" if all(met) else
                                          "publish only" if met[0] else
                                          "execute only" if met[1] else "no")
            print(f"{pair:<40}{cells[0]:>32}{cells[1]:>32}{target:>9}  {verdict}")
            print(f"  ({entry['label']})")

    for name, sides in summary["metrics"].items():
        where = ("the task's process and the main process's Request callbacks"
                 if main_process_callbacks else "the task's process")
        print(f"\nmetric cost in {where} ({name} - {name.removesuffix('_metrics')}, "
              f"median of per-round differences [95% CI] (IQR)): " + ", ".join(
                  f"{side} {s['median']:+.1f} us {_ci(s, '.1f')} ({s['iqr']:.1f})"
                  for side, s in sides.items()))
        if main_process_callbacks and "execute" in sides:
            # The execution records nothing in a worker's pool child (deliveries.py): its
            # side of the difference is what the main process's callbacks record.
            cost = sides["execute"]["median"]
            print(f"target (issue 18): the main process's metric cost per task with an SDK "
                  f"MeterProvider <= {MAIN_PROCESS_TARGET_US:.0f} us: {cost:.1f} us "
                  f"{'met' if cost <= MAIN_PROCESS_TARGET_US else 'NOT met'}")


#: Issue 18: what recording a delivery's metrics may cost the worker's main process.
MAIN_PROCESS_TARGET_US = 20.0


# -- instruction counts (valgrind's callgrind) -----------------------------------------
#
# CPU time still moves with what else the machine runs (shared caches, the other
# hyperthread). Instructions do not: each variant runs in its own process under
# callgrind, its publish loop inside itertools.starmap and its execute loop inside
# functools.reduce, two C functions nothing else on these paths calls, so their
# inclusive instruction counts are exactly the loops'. A cross-check of the timed
# ratios: instructions are not time (a cache miss costs more than an add).

_LOOPS = {"publish": "itertoolsmodule.c:starmap_next", "execute": "_functoolsmodule.c:functools_reduce"}


def callgrind_child(name: str, count: int, main_process_callbacks: bool = False) -> None:
    """Run one variant's two loops once, inside starmap (publish) and reduce (execute)."""
    # The same task ids and trace ids in every run: random ids hash differently (kombu's
    # and Celery's dicts of them) and are ints of varying size, which moved a variant's
    # count by up to 5k instructions per publish from one run to the next.
    import importlib
    import random
    import uuid as uuid_module

    random.seed(0)
    # (kombu.utils re-exports the function under the module's name: the module itself.)
    importlib.import_module("kombu.utils.uuid").uuid.__defaults__ = (  # its default argument is uuid4, bound at import
        lambda: uuid_module.UUID(int=random.getrandbits(128), version=4),
    )
    # No scheduled export inside the counted loops (200 messages' spans stay under the
    # batch size; settle() flushes between them).
    telemetry = Telemetry(export_delay_ms=3_600_000)
    variant = Variant(name, telemetry)
    bench = Bench(telemetry, main_process_callbacks=main_process_callbacks)
    bench.run(variant, 20)  # warm-up: imports, caches, the task's tracer
    task = bench.task
    variant.on()
    try:
        bench.settle()
        caller: Any = (contextlib.nullcontext() if variant.sampler.startswith("ratio:") else
                       variant.tracer_provider.get_tracer("benchmark-caller")
                       .start_as_current_span("caller"))
        with caller:
            gc.disable()
            collections.deque(itertools.starmap(task.delay, ((i,) for i in range(count))),
                              maxlen=0)
            gc.enable()
        messages = bench.drain(count)
        bench.settle()
        gc.disable()
        execute_one = bench.execute_one
        functools.reduce(lambda _, message: execute_one(message), messages, None)
        gc.enable()
    finally:
        variant.off()
    telemetry.shutdown()


_ANNOTATED = re.compile(r"^\s*([\d,]+)\s+\([^)]*\)\s+(\S+):(\w+)(\s+\[.*\])?\s*$")


def _inclusive(out_file: Path) -> dict[str, int]:
    """Inclusive instruction counts of the two loop functions in a callgrind output file."""
    text = subprocess.run(
        ["callgrind_annotate", "--inclusive=yes", "--threshold=100", str(out_file)],
        capture_output=True, text=True, check=True).stdout
    found: dict[str, int] = {}
    for line in text.splitlines():
        match = _ANNOTATED.match(line)
        if match is None:
            continue
        for side, function in _LOOPS.items():
            source, name = function.split(":")
            if match[3] == name and match[2].endswith(source) and side not in found:
                found[side] = int(match[1].replace(",", ""))
    missing = set(_LOOPS) - set(found)
    if missing:
        raise RuntimeError(f"no inclusive count for {missing} in {out_file}")
    return found


def count_instructions(names: list[str], count: int, jobs: int, candidate: Path | None,
                       sampler: str, main_process_callbacks: bool = False
                       ) -> dict[str, dict[str, float]]:
    """Instructions per message of each variant's publish and execute loop (callgrind)."""
    import concurrent.futures
    import tempfile

    workdir = tempfile.TemporaryDirectory(prefix="overhead-callgrind-")
    tmp = Path(workdir.name)

    def one(name: str) -> tuple[str, dict[str, float]]:
        out = tmp / f"{name.replace('@', '_').replace(':', '_')}.out"
        command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                   sys.executable, str(Path(__file__).resolve()), "--callgrind-child", name,
                   "--messages", str(count), "--sampler", sampler]
        if candidate is not None:
            command += ["--candidate", str(candidate)]
        if main_process_callbacks:
            command.append("--main-process-callbacks")
        env = dict(os.environ, PYTHONHASHSEED="0")
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{name} under callgrind:\n{done.stderr[-3000:]}")
        totals = _inclusive(out)
        return name, {side: totals[side] / count for side in _LOOPS}

    with workdir, concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        return dict(pool.map(one, names))


def print_instructions(names: list[str], per_message: dict[str, dict[str, float]]) -> None:
    base = per_message.get("none")
    print("\ninstructions per message (callgrind), overhead over 'none'")
    for name in names:
        row = per_message[name]
        over = ("" if base is None or name == "none" else
                "  " + "  ".join(f"{side} {row[side] - base[side]:+,.0f}" for side in _LOOPS))
        print(f"  {name:<22} publish {row['publish']:>10,.0f}  execute {row['execute']:>10,.0f}"
              + over)
    if base is None:
        return
    for numerator, denominator, target, label in TARGETS:
        if numerator in per_message and denominator in per_message:
            ratios = []
            for side in _LOOPS:
                den = per_message[denominator][side] - base[side]
                ratios.append((per_message[numerator][side] - base[side]) / den if den else
                              float("inf"))
            goal = "" if target is None else f"  (target <= {target:.2f})"
            print(f"  {numerator} / {denominator}: publish {ratios[0]:.2f}x, execute "
                  f"{ratios[1]:.2f}x{goal}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=200, help="messages per round and variant")
    parser.add_argument("--rounds", type=int, default=100, help="measured rounds")
    parser.add_argument("--warmup", type=int, default=2, help="unreported rounds first")
    parser.add_argument(
        "--variants",
        help=f"comma-separated, from {', '.join(ALL_VARIANTS)}, each optionally "
        f"@{'|'.join(SAMPLERS)} (default: {','.join(DEFAULT_VARIANTS)})",
    )
    parser.add_argument(
        "--sampler", default="always_on",
        help=f"sampler of the variants named without @: {' | '.join(SAMPLERS)} "
        "(default always_on)",
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
        default="thread",
        help="thread: CPU time of the measuring thread (default; robust to other load "
        "on the machine); cpu: of the whole process; wall: elapsed time",
    )
    parser.add_argument(
        "--main-process-callbacks", action="store_true",
        help="call Request.on_accepted and Request.on_success around each execution, "
        "as the worker's main process does (for what is recorded there)",
    )
    parser.add_argument(
        "--instructions", action="store_true",
        help="instead of timing: instructions per message of each variant, each in its "
        "own process under valgrind's callgrind (deterministic; slow: minutes)",
    )
    parser.add_argument("--jobs", type=int, default=2, help="callgrind processes at once")
    parser.add_argument("--callgrind-child", metavar="VARIANT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.candidate is not None:
        load_candidate(args.candidate)
    if args.callgrind_child:
        callgrind_child(args.callgrind_child, args.messages, args.main_process_callbacks)
        return 0
    names = parse_variants(args.variants, DEFAULT_VARIANTS)
    if args.instructions:
        started = time.perf_counter()
        per_message = count_instructions(names, args.messages, args.jobs, args.candidate,
                                         args.sampler, args.main_process_callbacks)
        print(f"{args.messages} messages per variant, one callgrind process each "
              f"({time.perf_counter() - started:.0f} s)")
        print_instructions(names, per_message)
        if args.json:
            args.json.write_text(json.dumps({
                "benchmark": "overhead --instructions", "messages": args.messages,
                "variants": names, "instructions_per_message": per_message,
                "python": sys.version.split()[0], "versions": _versions(),
            }, indent=2) + "\n")
            print(f"wrote {args.json}")
        return 0
    load_before = os.getloadavg()[0]
    telemetry = Telemetry(sampler=args.sampler)
    variants = [Variant(name, telemetry) for name in names]
    bench = Bench(telemetry, args.clock, args.main_process_callbacks)
    started = time.perf_counter()

    attributes = {variant.name: bench.check(variant) for variant in variants}
    matched = {n: a for n, a in attributes.items()
               if a is not None and n.partition("@")[0] in ("ours", "floor_attributes")}
    if len({frozenset(a) for a in matched.values()}) > 1:
        print("note: ours and floor_attributes set different span attributes:")
        for name, names_set in matched.items():
            others = set().union(*(a for n, a in matched.items() if n != name))
            print(f"  only {name}: {sorted(names_set - others)}")

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

    summary = summarize(names, raw, args.sampler)
    elapsed = time.perf_counter() - started
    print()
    print(
        f"{args.messages} messages x {args.rounds} rounds per variant; {args.clock} time; "
        f"sampler {args.sampler} unless @; median us per message; overhead = median of "
        f"per-round differences to 'none' (IQR)"
        + ("; with the main process's Request callbacks" if args.main_process_callbacks else "")
    )
    print_summary(names, summary, args.main_process_callbacks)
    load_after = os.getloadavg()[0]
    print(f"\n({elapsed:.0f} s; load average {load_before:.2f} before, {load_after:.2f} after, "
          f"{os.cpu_count()} CPUs)")

    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "benchmark": "overhead",
                    "argv": sys.argv[1:] if argv is None else argv,
                    "messages": args.messages,
                    "rounds": args.rounds,
                    "warmup": args.warmup,
                    "clock": args.clock,
                    "sampler": args.sampler,
                    "main_process_callbacks": args.main_process_callbacks,
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
