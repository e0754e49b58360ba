"""Where our time goes: pyinstrument on the publish and execute loops of overhead.py.

Only the timed loops are profiled (not draining, set-up or gc). Every sample is
attributed to the innermost frame of ``otel_celery_headers`` on its stack, at the line
it was executing, together with everything that line called (the OpenTelemetry SDK,
propagators, Celery helpers such as ``app.conf``...), unless the sample is inside the
``apply_async``/``send_task`` our wrappers wrap: that time is Celery's publish, not
ours. Samples with no frame of ours are Celery's own work (including its dispatch of
the signals we connect to).

The figures are shares of each path's profiled time, converted to microseconds per
message with an unprofiled measurement of the same variant taken first.

    pip install pyinstrument
    python benchmarks/profile_ours.py                       # ours, no MeterProvider
    python benchmarks/profile_ours.py --variant ours_metrics --html /tmp/profile.html
    python benchmarks/profile_ours.py --variant ours@parent_off    # unsampled

A flame graph of the whole run with py-spy instead:

    py-spy record -o /tmp/ours.svg -- python benchmarks/overhead.py --variants ours
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import overhead
from _common import Telemetry, Variant, load_candidate, median

try:
    from pyinstrument import Profiler
    from pyinstrument.frame_info import ATTRIBUTES_SEP, IDENTIFIER_SEP
except ImportError:  # pragma: no cover
    raise SystemExit("needs pyinstrument: pip install pyinstrument") from None

OURS = ("/otel_celery_headers/", "/otel_celery_headers_candidate/")
CELERY = ("/celery/", "/kombu/")
# What our wrappers wrap: time below these is Celery's publish, not ours.
WRAPPED = {"apply_async", "send_task"}


def _parse(frame_info: str) -> tuple[str, str, int]:
    """(function, file, line being executed) of one pyinstrument frame record."""
    identifier, _, attributes = frame_info.partition(ATTRIBUTES_SEP)
    function, file, first_line = (identifier.split(IDENTIFIER_SEP) + ["", ""])[:3]
    line = int(first_line or 0)
    for attribute in attributes.split(ATTRIBUTES_SEP) if attributes else ():
        if attribute.startswith("l") and attribute[1:].isdigit():
            line = int(attribute[1:])
    return function, file, line


def _short(file: str) -> str:
    for marker in OURS:
        if marker in file:
            return file.split(marker, 1)[1]
    return file.rsplit("/site-packages/", 1)[-1]


def attribute(session: Any) -> tuple[float, float, collections.Counter[tuple[str, str]]]:
    """(total seconds, seconds in our code, seconds per (our line, callee))."""
    total = ours = 0.0
    lines: collections.Counter[tuple[str, str]] = collections.Counter()
    for stack, seconds in session.frame_records:
        total += seconds
        frames = [_parse(f) for f in stack]
        innermost = None
        for index in range(len(frames) - 1, -1, -1):
            if any(marker in frames[index][1] for marker in OURS):
                innermost = index
                break
        if innermost is None:
            continue
        deeper = frames[innermost + 1:]
        if deeper and deeper[0][0] in WRAPPED and any(m in deeper[0][1] for m in CELERY):
            continue  # inside the Celery call our wrapper made
        function, file, line = frames[innermost]
        callee = ""
        if deeper:
            callee_function, callee_file, _ = deeper[0]
            callee = f"{callee_function} ({_short(callee_file)})"
        ours += seconds
        lines[(f"{_short(file)}:{line} {function}", callee)] += seconds
    return total, ours, lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="ours")
    parser.add_argument("--candidate", type=Path, metavar="SRC_DIR",
                        help="profile another copy of the package (variant 'candidate')")
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--interval", type=float, default=0.0001, help="sampling interval, s")
    parser.add_argument("--top", type=int, default=20, help="lines shown per path")
    parser.add_argument("--html", type=Path, help="also write pyinstrument's HTML report")
    args = parser.parse_args(argv)

    if args.candidate is not None:
        load_candidate(args.candidate)
    telemetry = Telemetry()
    bench = overhead.Bench(telemetry, "thread")
    variant = Variant(args.variant, telemetry)
    none = Variant("none", telemetry)

    # Unprofiled figures first, to turn shares into microseconds.
    plain: dict[str, list[float]] = {"publish": [], "execute": [], "publish_none": [],
                                     "execute_none": []}
    for _ in range(6):
        p0, e0 = bench.run(none, args.messages)
        p1, e1 = bench.run(variant, args.messages)
        plain["publish"].append(p1)
        plain["execute"].append(e1)
        plain["publish_none"].append(p0)
        plain["execute_none"].append(e0)

    profilers = {side: Profiler(interval=args.interval, async_mode="disabled")
                 for side in ("publish", "execute")}
    variant.on()
    try:
        for _ in range(args.rounds):
            bench.settle()
            profilers["publish"].start()
            bench.publish(args.messages, variant)
            profilers["publish"].stop()
            messages = bench.drain(args.messages)
            bench.settle()
            profilers["execute"].start()
            bench.execute(messages)
            profilers["execute"].stop()
    finally:
        variant.off()

    for side, profiler in profilers.items():
        session = profiler.last_session
        assert session is not None
        total, ours, lines = attribute(session)
        us = median(plain[side])
        us_none = median(plain[side + "_none"])
        print(f"\n== {side}: {us:.0f} us per message with {args.variant} "
              f"({us - us_none:+.0f} over none, unprofiled); {len(session.frame_records)} samples")
        print(f"   time in otel_celery_headers and what it calls (not the wrapped Celery "
              f"call): {ours / total:.0%} of the path = ~{ours / total * us:.0f} us per message")
        print(f"   {'~us/msg':>8} {'share':>6}  our line -> what it calls")
        for (where, callee), seconds in lines.most_common(args.top):
            share = seconds / total
            print(f"   {share * us:8.1f} {share:6.1%}  {where}" + (f" -> {callee}" if callee else ""))
        if args.html:
            path = args.html.with_name(f"{args.html.stem}-{side}{args.html.suffix}")
            path.write_text(profiler.output_html())
            print(f"   wrote {path}")
    telemetry.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
