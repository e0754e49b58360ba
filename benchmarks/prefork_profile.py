"""Where a prefork worker's CPU goes, per process, while it drains N tasks (issue 18).

For each variant (``none``, ``ours``, ``ours_metrics``) this fills a queue on a throwaway
Redis exactly as ``end_to_end.py --pools prefork`` does, starts the same worker
subprocess (``celery worker -P prefork -c 2``, SDK MeterProvider exporting every 1 s for
``ours_metrics``), and samples ``/proc/<pid>/stat`` (utime + stime) of the worker's main
process and of each pool child every 20 ms. The window runs from the first sample in
which the queue has shrunk (the main process has started consuming) to the worker's
report (the last task has ended), so start-up and shutdown are not counted.
It prints, per variant: wall seconds, tasks/s, CPU us per task of the main process and
of the children, and each process's CPU as a share of one core over the window.

``--py-spy DIR`` also records the main process and one child with
``py-spy record --format raw`` (collapsed stacks, --nonblocking, GIL-idle frames
dropped) into DIR/<variant>-main.txt and -child.txt.

    python benchmarks/prefork_profile.py --tasks 4000
    python benchmarks/prefork_profile.py --tasks 6000 --variants ours_metrics --py-spy /tmp/spy
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import redis
from _common import Telemetry, Variant, redis_server, start_worker, stop_worker

import end_to_end

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, field: int = -1) -> float:
    """utime + stime of ``pid`` (or field 11, utime, or 12, stime), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    if field >= 0:
        return int(fields[field]) / TICK
    return (int(fields[11]) + int(fields[12])) / TICK


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
        except FileNotFoundError:
            pass
    return out


def threads(pid: int) -> dict[str, float]:
    """CPU seconds of each thread of ``pid``, by "tid name"."""
    out: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                raw = f.read()
        except FileNotFoundError:
            continue
        name = raw[raw.index("(") + 1:raw.rindex(")")]
        fields = raw.rsplit(")", 1)[1].split()
        out[f"{tid} {name}"] = (int(fields[11]) + int(fields[12])) / TICK
    return out


def snapshot(main: int) -> dict[int, float]:
    snap = {main: cpu_seconds(main)}
    for c in children(main):
        try:
            snap[c] = cpu_seconds(c)
        except FileNotFoundError:
            pass
    return snap


def one_drain(broker: str, client: redis.Redis, telemetry: Telemetry, name: str, tasks: int,
              spy_dir: Path | None) -> dict[str, Any]:
    variant = Variant(name, telemetry)
    queue = f"prof-{name}-{uuid.uuid4().hex[:8]}"
    variant.on()
    try:
        apply_async = end_to_end.app.tasks[end_to_end.TASK].apply_async
        for i in range(tasks):
            apply_async((i,), queue=queue)
    finally:
        variant.off()
    assert client.llen(queue) == tasks
    report_key = f"bench:report:{queue}"
    proc = start_worker(end_to_end.__file__, broker, ["--variant", name, "--pool", "prefork"],
                        queue, tasks, report_key)
    spies: list[subprocess.Popen[bytes]] = []
    try:
        # Wait for the pool's two children, then for the first message to leave the queue.
        deadline = time.monotonic() + 60
        while len(children(proc.pid)) < end_to_end.PREFORK_CONCURRENCY:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"{name}: no pool children")
            time.sleep(0.01)
        kids = children(proc.pid)
        if spy_dir is not None:
            for label, pid in (("main", proc.pid), ("child", kids[0])):
                spies.append(subprocess.Popen(
                    [shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"),
                     "record", "--pid", str(pid), "--rate", "250", "--nonblocking",
                     "--format", "raw", "--output", str(spy_dir / f"{name}-{label}.txt")],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        while client.llen(queue) == tasks:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"{name}: worker did not start consuming")
            time.sleep(0.002)
        t0, s0 = time.perf_counter(), snapshot(proc.pid)
        sys0 = cpu_seconds(proc.pid, 12)
        th0 = threads(proc.pid)
        # The worker's report comes after its span flush (up to seconds late), so keep a
        # timeline and end the window at the report's own "seconds" (first task start to
        # last task end, a clock shared by all processes on Linux).
        timeline: list[tuple[float, dict[int, float]]] = [(t0, s0)]
        reply = None
        while reply is None:
            reply = client.lpop(report_key)
            if reply is None:
                if proc.poll() is not None or time.monotonic() > deadline + 120:
                    raise RuntimeError(f"{name}: no report")
                time.sleep(0.02)
                timeline.append((time.perf_counter(), snapshot(proc.pid)))
        seconds = json.loads(reply)["seconds"]
        t1, s1 = min(timeline, key=lambda point: abs(point[0] - (t0 + seconds)))
        main_sys = cpu_seconds(proc.pid, 12) - sys0  # to the report: slightly past t1
        th1 = threads(proc.pid)
    finally:
        for spy in spies:
            spy.send_signal(2)  # SIGINT: py-spy writes its output and exits
        for spy in spies:
            try:
                spy.wait(timeout=30)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()
        stop_worker(proc)
    client.delete(queue, report_key)
    wall = t1 - t0
    main_cpu = s1[proc.pid] - s0[proc.pid]
    kid_cpu = {pid: s1[pid] - s0.get(pid, 0.0) for pid in s1 if pid != proc.pid}
    return {"wall": wall, "per_s": tasks / wall,
            "main_us": main_cpu / tasks * 1e6, "children_us": sum(kid_cpu.values()) / tasks * 1e6,
            "main_core": main_cpu / wall, "main_sys_us": main_sys / tasks * 1e6,
            "main_threads_us": {k: round((v - th0.get(k, 0.0)) / tasks * 1e6)
                                for k, v in th1.items() if v - th0.get(k, 0.0) > 0},
            "child_cores": sorted((c / wall for c in kid_cpu.values()), reverse=True)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=4000)
    parser.add_argument("--variants", default="none,ours,ours_metrics")
    parser.add_argument("--py-spy", type=Path, dest="spy")
    args = parser.parse_args(argv)
    if args.spy:
        args.spy.mkdir(parents=True, exist_ok=True)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    rows: dict[str, dict[str, Any]] = {}
    with redis_server() as broker:
        end_to_end.app.conf.broker_url = broker
        client = redis.Redis.from_url(broker)
        telemetry = Telemetry()
        for name in names:
            rows[name] = one_drain(broker, client, telemetry, name, args.tasks, args.spy)
            r = rows[name]
            print(f"{name}: {r['per_s']:.0f} tasks/s", flush=True)
        telemetry.shutdown()
    print(f"\n{args.tasks} tasks per variant, prefork -c {end_to_end.PREFORK_CONCURRENCY}, "
          f"CPU from /proc/<pid>/stat over the drain")
    head = (f"{'variant':<14}{'tasks/s':>9}{'vs none':>8}{'main us/task':>14}{'children us/task':>18}"
            f"{'main core':>11}{'child cores':>14}{'main sys us':>13}")
    print(head)
    print("-" * len(head))
    base = rows.get("none", {}).get("per_s")
    for name, r in rows.items():
        vs = f"{r['per_s'] / base:.2f}" if base else ""
        kids = "/".join(f"{c:.2f}" for c in r["child_cores"])
        print(f"{name:<14}{r['per_s']:>9.0f}{vs:>8}{r['main_us']:>14.0f}{r['children_us']:>18.0f}"
              f"{r['main_core']:>11.2f}{kids:>14}{r['main_sys_us']:>13.0f}")
    print("main process threads, CPU us/task (drain to report):")
    for name, r in rows.items():
        print(f"  {name}: {r['main_threads_us']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
