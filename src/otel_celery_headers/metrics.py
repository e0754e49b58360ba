"""Metric instruments (OpenTelemetry messaging conventions, units in UCUM).

Attributes are bounded: messaging system, destination (queue), operation, task name,
outcome and error type. Never a task id: that would be one series per message.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry.context import Context
from opentelemetry.metrics import Counter, Histogram, Meter
from opentelemetry.semconv._incubating.metrics.messaging_metrics import (
    MESSAGING_CLIENT_CONSUMED_MESSAGES,
    MESSAGING_CLIENT_OPERATION_DURATION,
    MESSAGING_CLIENT_SENT_MESSAGES,
    MESSAGING_PROCESS_DURATION,
)

from .attributes import CELERY_QUEUE_TIME

# The boundaries the messaging conventions recommend for duration histograms.
_DURATION_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10]
# Time in queue spans milliseconds to hours (countdown tasks are measured from their eta).
_QUEUE_BUCKETS = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600]


def histogram(meter: Meter, name: str, description: str, buckets: list[float]) -> Histogram:
    try:
        return meter.create_histogram(
            name, unit="s", description=description, explicit_bucket_boundaries_advisory=buckets
        )
    except TypeError:  # opentelemetry-api before 1.23 has no advisory parameter
        return meter.create_histogram(name, unit="s", description=description)


@dataclass(frozen=True)
class Instruments:
    sent: Counter
    publish_duration: Histogram
    consumed: Counter
    process_duration: Histogram
    queue_time: Histogram

    @classmethod
    def create(cls, meter: Meter) -> Instruments:
        return cls(
            sent=meter.create_counter(
                MESSAGING_CLIENT_SENT_MESSAGES,
                unit="{message}",
                description="Messages a producer attempted to send to the broker.",
            ),
            publish_duration=histogram(
                meter,
                MESSAGING_CLIENT_OPERATION_DURATION,
                "Duration of publishing a task message.",
                _DURATION_BUCKETS,
            ),
            consumed=meter.create_counter(
                MESSAGING_CLIENT_CONSUMED_MESSAGES,
                unit="{message}",
                description="Task messages a worker took: one per delivery, whatever ended it.",
            ),
            process_duration=histogram(
                meter,
                MESSAGING_PROCESS_DURATION,
                "Duration of a delivery from its start in the pool to its outcome.",
                _DURATION_BUCKETS,
            ),
            queue_time=histogram(
                meter,
                CELERY_QUEUE_TIME,
                "Time a task message waited between publish (or its eta) and execution.",
                _QUEUE_BUCKETS,
            ),
        )

    def recording(self) -> bool:
        """False while no MeterProvider is behind the instruments: nothing would record.

        Without a MeterProvider, the API hands out proxy instruments that forward to
        nothing until one is set (and then to the real ones, so this is asked each
        time, not once). Knowing it, a publish builds no attributes and reads no clock
        for nobody (issue 12). Instruments of any other kind are taken as recording.
        """
        return getattr(self.sent, "_real_instrument", self.sent) is not None

    def published(self, seconds: float, attributes: Mapping[str, Any]) -> None:
        self.sent.add(1, attributes)
        self.publish_duration.record(seconds, attributes)

    def processed(
        self,
        seconds: float | None,
        attributes: Mapping[str, Any],
        context: Context | None = None,
    ) -> None:
        """One delivery; ``seconds`` None for one that never started (no duration:
        a zero would drag the percentiles of the deliveries that ran)."""
        self.consumed.add(1, attributes)
        if seconds is not None:
            # context: the task's trace, for the exemplar (the SDK's trace-based filter).
            self.process_duration.record(seconds, attributes, context=context)

    def waited(
        self, seconds: float, attributes: Mapping[str, Any], context: Context | None = None
    ) -> None:
        self.queue_time.record(seconds, attributes, context=context)

    def all(self) -> tuple[Counter | Histogram, ...]:
        return (
            self.sent, self.publish_duration, self.consumed, self.process_duration, self.queue_time
        )
