"""What the OpenTelemetry SDK alone costs for the metrics of one delivery (issue 18's floor).

The worker's main process records, per delivery, ``celery.message.queue_time`` at accept
and ``messaging.process.duration`` at the outcome (two SDK histograms, each with the
delivery's attributes and a context whose span is the producer's, for the exemplar), and
adds one to ``messaging.client.consumed.messages`` (our in-memory DeliveryCounter). This
times exactly those three calls with the attribute sets a delivery has, through an SDK
``MeterProvider`` with a reader (its default exemplar filter, trace-based), and no code of
ours around them but the counter. Beside it, in the same rounds: each histogram record
without attributes and without an exemplar, to show where the SDK's time goes.

Compare with ``overhead.py --main-process-callbacks --variants none,ours,ours_metrics``,
whose execute-side difference is what recording costs the main process with our code: the
floor here is the part no instrumentation that records these points can avoid.

    python benchmarks/sdk_floor.py [--records 20000 --rounds 15]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable

from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from otel_celery_headers import metrics as ours

QUEUED = {
    "messaging.system": "redis",
    "messaging.operation.name": "process",
    "celery.task.name": "tasks.add",
    "messaging.destination.name": "celery",
}
PROCESSED = {**QUEUED, "celery.task.state": "SUCCESS"}
#: The target of issue 18 for all of a delivery's metric work in the main process.
TARGET_US = 20.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=15)
    options = parser.parse_args()
    provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    instruments = ours.Instruments.create(provider.get_meter("sdk-floor"))
    producer = trace.set_span_in_context(NonRecordingSpan(SpanContext(
        0x5B8EFFF798038103D269B633813FC60C, 0xEEE19B7EC3C1B174, True, TraceFlags(1))))

    def delivery() -> None:  # what a delivery records, as delivery_metrics.py does
        instruments.queue_time.record(0.01, QUEUED, context=producer)
        instruments.consumed.add(1, PROCESSED)
        instruments.process_duration.record(0.002, PROCESSED, context=producer)

    cases: dict[str, Callable[[], None]] = {
        "one delivery's records": delivery,
        "one histogram record": lambda: instruments.process_duration.record(
            0.002, PROCESSED, context=producer),
        "  without an exemplar": lambda: instruments.process_duration.record(0.002, PROCESSED),
        "  without attributes": lambda: instruments.process_duration.record(
            0.002, context=producer),
        "one DeliveryCounter add": lambda: instruments.consumed.add(1, PROCESSED),
    }
    rows: dict[str, list[float]] = {name: [] for name in cases}
    gc.disable()
    try:
        for index in range(options.rounds + 1):
            for name, call in cases.items():
                start = time.thread_time_ns()
                for _ in range(options.records):
                    call()
                if index:  # the first round warms up
                    rows[name].append((time.thread_time_ns() - start) / options.records / 1000)
    finally:
        gc.enable()
    for name, values in rows.items():
        print(f"{name:<28} {statistics.median(values):6.2f} us (IQR "
              f"{statistics.quantiles(values, n=4)[2] - statistics.quantiles(values, n=4)[0]:.2f})")
    floor = statistics.median(rows["one delivery's records"])
    print(f"\nthe SDK's floor per delivery: {floor:.1f} us, {floor / TARGET_US:.2f}x issue 18's "
          f"{TARGET_US:.0f} us target for all of the main process's metric work")


if __name__ == "__main__":
    main()
