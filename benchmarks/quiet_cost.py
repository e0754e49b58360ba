"""What suppress_broker_traffic adds to each acknowledgement (quiet.py).

The consumer loop pays one attach/detach per consumer start, not per message; a message
pays once more, in ``kombu.Message.ack`` (wrapped so the threads pool's executor threads
acknowledge quietly too). This times, in one process and in alternating rounds, an ack
of a kombu message over a channel that does nothing, plain and through our wrapper,
from inside the quiet consumer loop (prefork, solo, gevent) and from outside it (the
threads pool's executor threads).

    python benchmarks/quiet_cost.py [--acks 100000 --rounds 15]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from typing import Any

from kombu.message import Message
from wrapt import wrap_function_wrapper

from opentelemetry import context as otel_context

from otel_celery_headers.quiet import Quiet, quieted


class _Channel:
    no_ack_consumers = None

    def basic_ack(self, delivery_tag: Any, multiple: bool = False) -> None:
        pass


class Plain(Message):
    pass


class Quieted(Message):
    pass


def _per_ack(cls: type, acks: int) -> float:
    channel = _Channel()
    messages = [cls(body=b"", delivery_tag=i, channel=channel) for i in range(acks)]
    start = time.thread_time_ns()
    for message in messages:
        message.ack()
    return (time.thread_time_ns() - start) / acks / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--acks", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=15)
    options = parser.parse_args()
    Quieted.ack = Message.ack  # its own function object, wrapped below (Plain's is not)
    wrap_function_wrapper(Quieted, "ack", Quiet().wrap_quiet)
    rows: list[tuple[float, float, float]] = []
    gc.disable()
    try:
        for index in range(options.rounds + 1):
            plain, outside = _per_ack(Plain, options.acks), _per_ack(Quieted, options.acks)
            token = otel_context.attach(quieted())  # as inside the consumer loop
            try:
                inside = _per_ack(Quieted, options.acks)
            finally:
                otel_context.detach(token)
            if index:
                rows.append((plain, outside, inside))
    finally:
        gc.enable()
    plain = statistics.median(r[0] for r in rows)
    outside = statistics.median(r[1] - r[0] for r in rows)
    inside = statistics.median(r[2] - r[0] for r in rows)
    print(f"ack, kombu alone (no broker): {plain:.2f} us")
    print(f"suppress_broker_traffic adds, ack inside the consumer loop: +{inside:.2f} us")
    print(f"suppress_broker_traffic adds, ack from a threads-pool thread: +{outside:.2f} us")


if __name__ == "__main__":
    main()
