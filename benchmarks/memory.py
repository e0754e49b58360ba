"""Nothing grows with the number of tasks: 100,000 tasks through Celery, in one process.

Tasks are published with ``Task.delay`` under an active span to the ``memory://``
broker and executed with the worker's own ``Request(message, app=app, task=task)
.execute()``, in batches. After a warm-up, and then every ``--every`` tasks, with the
span queue flushed and a full ``gc.collect()``, it records:

* live span objects (``opentelemetry.sdk.trace.Span``, ended or not);
* live objects of each class defined in ``otel_celery_headers`` (per-publish and
  per-execution state such as ``_Publish``/``_Execution`` must be gone);
* the size of every container held by an ``otel_celery_headers`` module or by an
  object of one of its classes (caches, ``Options._cache``, the error-once set...);
* our ContextVars and the OpenTelemetry context outside a publish or task;
* Celery's task request stack; all gc-tracked objects; the process RSS.

It fails (exit 1) if spans or per-task state outlive their task, if a container
grows, or if RSS grows by more than ``--max-rss-mb`` (5) after the warm-up.

    python benchmarks/memory.py                      # 100,000 tasks, ours with metrics
    python benchmarks/memory.py --variants ours,ours_metrics,official --tasks 50000
                                                     # (one process per variant)
"""

from __future__ import annotations

import argparse
import collections
import contextvars
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import overhead
from _common import Telemetry, Variant, parse_variants, rss_bytes
from celery.worker.request import Request
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import Span as SdkSpan

PACKAGE = "otel_celery_headers"
CONTAINERS = (dict, list, set, frozenset, collections.deque, weakref.WeakKeyDictionary,
              weakref.WeakValueDictionary, weakref.WeakSet)


def _ours(module_name: object) -> bool:
    if not isinstance(module_name, str):
        return False
    return module_name == PACKAGE or module_name.startswith(PACKAGE + ".")


# Type checks by MRO, never isinstance(): isinstance against an ABC (Span,
# WeakKeyDictionary) fills the ABC's negative cache with a weakref per type seen, and
# the snapshot would measure its own growth.
def _subclasses(cls: type) -> set[type]:
    found = {cls}
    for sub in cls.__subclasses__():
        found |= _subclasses(sub)
    return found


def _size(value: Any) -> int | None:
    for base in type(value).__mro__:
        if base in CONTAINERS:
            return len(value)
    return None


def snapshot() -> dict[str, Any]:
    gc.collect()
    objects = gc.get_objects()
    span_types = _subclasses(SdkSpan)
    spans = 0
    ours_by_type: collections.Counter[str] = collections.Counter()
    containers: dict[str, int] = {}
    all_by_type: collections.Counter[str] = collections.Counter()
    for obj in objects:
        cls = type(obj)
        all_by_type[cls.__qualname__] += 1
        if cls in span_types:
            spans += 1
        if _ours(getattr(cls, "__module__", None)) and hasattr(obj, "__dict__"):
            ours_by_type[cls.__qualname__] += 1
            for attr, value in vars(obj).items():
                size = _size(value)
                if size is not None:
                    key = f"{cls.__qualname__}#{id(obj):x}.{attr}"
                    containers[key] = size
    for name, module in list(sys.modules.items()):
        if not _ours(name) or module is None:
            continue
        for attr, value in vars(module).items():
            size = _size(value)
            if size is not None and not attr.startswith("__"):
                containers[f"{name}.{attr}"] = size
    context_vars = {}
    for name, module in list(sys.modules.items()):
        if _ours(name) and module is not None:
            for attr, value in vars(module).items():
                if type(value) is contextvars.ContextVar:
                    context_vars[f"{name}.{attr}"] = repr(value.get(None))
    return {
        "rss_mb": rss_bytes() / 2**20,
        "gc_objects": len(objects),
        "spans": spans,
        "ours_by_type": dict(ours_by_type),
        "containers": containers,
        "context_vars": context_vars,
        "otel_context_keys": len(otel_context.get_current()),
        "task_request_stack": len(overhead.app.tasks[overhead.noop.name].request_stack.stack),
        "_all_by_type": all_by_type,
    }


def _grown(before: collections.Counter[str], after: dict[str, Any], top: int = 4) -> str:
    counts = (after["_all_by_type"] - before).most_common(top)
    return ", ".join(f"{name} +{n}" for name, n in counts)


def run_tasks(bench: overhead.Bench, count: int, batch: int) -> None:
    app, task = overhead.app, bench.task
    pid = os.getpid()
    done = 0
    while done < count:
        n = min(batch, count - done)
        bench.publish(n)
        for message in bench.drain(n):
            request = Request(message, app=app, task=task)
            if bench.main_process_callbacks:
                # As the worker's main process does around each delivery (deliveries.py
                # records there): accepted by the pool, then the result.
                request.on_accepted(pid, time.monotonic())
                request.on_success((False, request.execute(), 0.0))
            else:
                request.execute()
        done += n


def check_variant(name: str, telemetry: Telemetry, bench: overhead.Bench, args: argparse.Namespace
                  ) -> tuple[bool, dict[str, Any]]:
    variant = Variant(name, telemetry)
    variant.on()
    failures: list[str] = []
    started = time.perf_counter()
    try:
        run_tasks(bench, args.warmup, args.batch)
        telemetry.flush()
        base = snapshot()
        done = 0
        previous = base
        while done < args.tasks:
            n = min(args.every, args.tasks - done)
            run_tasks(bench, n, args.batch)
            done += n
            telemetry.flush()
            # Keep only the baseline and the previous snapshot: a growing list of
            # snapshots would show up in the object counts.
            previous_all = previous["_all_by_type"]
            previous = None  # type: ignore[assignment]
            snap = snapshot()
            print(f"  {name:<13} {done:>7} tasks  rss {snap['rss_mb']:7.1f} MB "
                  f"({snap['rss_mb'] - base['rss_mb']:+.1f})  spans alive {snap['spans']}  "
                  f"gc objects {snap['gc_objects'] - base['gc_objects']:+d}"
                  + (f"  grown: {grown}" if (grown := _grown(previous_all, snap)) else ""),
                  flush=True)
            previous = snap
    finally:
        variant.off()
    seconds = time.perf_counter() - started
    last = previous

    if last["spans"] > 0:
        failures.append(f"{last['spans']} span objects alive after flush (baseline {base['spans']})")
    for cls in ("_Publish", "_Execution"):
        if last["ours_by_type"].get(cls, 0):
            failures.append(f"{last['ours_by_type'][cls]} {cls} objects alive between tasks")
    for key, size in last["containers"].items():
        before = base["containers"].get(key)
        if before is None:
            # An object created after the warm-up (should not happen): judge it alone.
            if size > 16:
                failures.append(f"new container {key} holds {size}")
        elif size > before:
            failures.append(f"{key} grew {before} -> {size}")
    for key, value in last["context_vars"].items():
        if value != "None":
            failures.append(f"ContextVar {key} still set between tasks: {value}")
    if last["otel_context_keys"]:
        failures.append(f"OpenTelemetry context not empty between tasks ({last['otel_context_keys']} keys)")
    if last["task_request_stack"]:
        failures.append(f"Celery request stack holds {last['task_request_stack']}")
    growth = last["rss_mb"] - base["rss_mb"]
    if growth > args.max_rss_mb:
        failures.append(f"RSS grew {growth:.1f} MB (> {args.max_rss_mb} MB)")

    grown = (last["_all_by_type"] - base["_all_by_type"]).most_common(5)
    result = {
        "variant": name,
        "tasks": args.tasks,
        "warmup": args.warmup,
        "seconds": seconds,
        "rss_mb_start": base["rss_mb"],
        "rss_mb_end": last["rss_mb"],
        "rss_growth_mb": growth,
        "gc_objects_growth": last["gc_objects"] - base["gc_objects"],
        "most_grown_types": grown,
        "spans_alive": last["spans"],
        "ours_objects": last["ours_by_type"],
        "containers": {k: [base["containers"].get(k), v] for k, v in last["containers"].items()},
        "context_vars": last["context_vars"],
        "failures": failures,
    }
    return not failures, result


def _without_option(args: list[str], option: str) -> list[str]:
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=100_000, help="tasks measured, per variant")
    parser.add_argument("--warmup", type=int, default=5_000, help="tasks before the baseline")
    parser.add_argument("--every", type=int, default=20_000, help="snapshot interval")
    parser.add_argument("--batch", type=int, default=1_000, help="messages in flight at once")
    parser.add_argument("--variants", help="comma-separated (default: ours_metrics)")
    parser.add_argument("--max-rss-mb", type=float, default=5.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--main-process-callbacks", action="store_true",
                        help="also Request.on_accepted / on_success per task, as the worker's "
                             "main process (where delivery metrics are recorded)")
    args = parser.parse_args(argv)

    names = parse_variants(args.variants, ("ours_metrics",))
    if len(names) > 1:
        # One process per variant: each starts from the same heap, and the RSS of one
        # is not flattered by what an earlier one already grew.
        failed = False
        forwarded = [a for a in (argv if argv is not None else sys.argv[1:])]
        forwarded = _without_option(forwarded, "--variants")
        forwarded = _without_option(forwarded, "--json")
        results = []
        for name in names:
            out = Path(tempfile.mkstemp(prefix="otel-celery-memory-", suffix=".json")[1])
            code = subprocess.call([sys.executable, __file__, "--variants", name,
                                    "--json", str(out), *forwarded])
            failed |= code != 0
            results.extend(json.loads(out.read_text())["results"])
            out.unlink()
        if args.json:
            args.json.write_text(json.dumps({"benchmark": "memory", "results": results},
                                            indent=2) + "\n")
            print(f"wrote {args.json}")
        return 1 if failed else 0
    telemetry = Telemetry()
    bench = overhead.Bench(telemetry, main_process_callbacks=args.main_process_callbacks)
    ok_all = True
    results = []
    for name in names:
        print(f"{name}: {args.warmup} warm-up tasks, then {args.tasks}")
        ok, result = check_variant(name, telemetry, bench, args)
        ok_all &= ok
        results.append(result)
        print(f"{name}: {result['tasks']} tasks in {result['seconds']:.0f} s; "
              f"RSS {result['rss_mb_start']:.1f} -> {result['rss_mb_end']:.1f} MB "
              f"({result['rss_growth_mb']:+.2f} MB); spans alive {result['spans_alive']}; "
              f"gc objects {result['gc_objects_growth']:+d}")
        print(f"  our objects alive: {result['ours_objects']}")
        print("  our containers (after warm-up -> end): " + ", ".join(
            f"{k.split('#')[0] if '#' in k else k}{'.' + k.split('.')[-1] if '#' in k else ''}"
            f" {v[0]}->{v[1]}" for k, v in sorted(result["containers"].items())))
        print(f"  ContextVars between tasks: {result['context_vars']}")
        if result["failures"]:
            for failure in result["failures"]:
                print(f"  FAIL: {failure}")
        else:
            print("  OK: no growth")
    telemetry.shutdown()
    if args.json:
        args.json.write_text(json.dumps({"benchmark": "memory", "results": results}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if ok_all else 1


if __name__ == "__main__":
    raise SystemExit(main())
