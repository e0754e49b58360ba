"""What one wrapt wrapper costs a method call it only passes through.

A publish goes through two (``Task.apply_async``, ``Celery.send_task``); the benchmark
floor through none. This times, in one process and in alternating rounds, a plain
method call and the same call through a ``wrap_function_wrapper`` whose wrapper does
what ours does when it has nothing to add (one ContextVar read, then the call).

    python benchmarks/wrapt_cost.py [--calls 200000 --rounds 15]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from contextvars import ContextVar
from typing import Any

import wrapt

_marker: ContextVar[object | None] = ContextVar("marker", default=None)


class Plain:
    def send(self, *args: Any, **kwargs: Any) -> int:
        return 1


class Wrapped:
    def send(self, *args: Any, **kwargs: Any) -> int:
        return 1


def _pass_through(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    if _marker.get() is not None:
        return wrapped(*args, **kwargs)
    return wrapped(*args, **kwargs)


wrapt.wrap_function_wrapper(Wrapped, "send", _pass_through)


def _per_call(target: Any, calls: int) -> float:
    start = time.thread_time_ns()
    for _ in range(calls):
        target.send("t.add", (1, 2), queue="celery")
    return (time.thread_time_ns() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=15)
    options = parser.parse_args()
    plain, wrapped = Plain(), Wrapped()
    rows: list[tuple[float, float]] = []
    gc.disable()
    try:
        for index in range(options.rounds + 1):
            order = [(plain, 0), (wrapped, 1)] if index % 2 else [(wrapped, 1), (plain, 0)]
            row = [0.0, 0.0]
            for target, slot in order:
                row[slot] = _per_call(target, options.calls)
            if index:  # the first round warms up
                rows.append((row[0], row[1]))
    finally:
        gc.enable()
    plain_ns = statistics.median(r[0] for r in rows)
    wrapped_ns = statistics.median(r[1] for r in rows)
    extra = [r[1] - r[0] for r in rows]
    print(f"wrapt {wrapt.__version__}, {options.rounds} rounds x {options.calls} calls, thread time")
    print(f"plain method call        {plain_ns:6.0f} ns")
    print(f"through a wrapt wrapper  {wrapped_ns:6.0f} ns  ({wrapped_ns / plain_ns:.1f}x)")
    print(f"the wrapper's cost       {statistics.median(extra):6.0f} ns per call "
          f"(IQR {statistics.quantiles(extra, n=4)[2] - statistics.quantiles(extra, n=4)[0]:.0f})")


if __name__ == "__main__":
    main()
