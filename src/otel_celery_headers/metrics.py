"""Metric instruments (OpenTelemetry messaging conventions, units in UCUM).

Attributes are bounded: messaging system, destination (queue), operation, task name,
outcome and error type; on deliveries, the beat entry and ``celery.delivery.redelivered``
(attributes.metric_attributes). Never a task id: that would be one series per message.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry.context import Context
from opentelemetry.metrics import (
    CallbackOptions,
    Counter,
    Histogram,
    Meter,
    Observation,
)
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


class DeliveryCounter:
    """``messaging.client.consumed.messages``: summed here, observed by the SDK.

    The worker's main process counts every delivery of a prefork pool, on the one
    thread that runs its event loop. A synchronous SDK counter costs about as much per
    ``add`` as a histogram's ``record`` (92k instructions on SDK 1.45: issue 18's
    profile, docs/explanation/performance.md), while the reader needs only the totals
    at each collection. So each delivery adds one to a total per attribute set, under a
    lock, and an ObservableCounter reports the cumulative totals when the SDK collects:
    the same monotonic Sum to every exporter. Nothing of an exemplar is lost in the main
    process (no span is current there, so a synchronous counter had none); a pool
    child that counts itself (``instrument()`` in ``worker_process_init``) and eager
    tasks now report the count without one, as the histograms keep theirs.

    One per Meter (the SDK gives one Meter per provider and scope), so a later
    ``instrument()`` with the same provider goes on counting from the same totals, as
    the SDK's own instrument would. A forked child starts from zero: its copy of the
    parent's totals is the parent's to report (forkmetrics.py does the same for the
    SDK's storage).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._totals: dict[frozenset[tuple[str, Any]], int] = {}
        _all_counters.add(self)

    def add(self, amount: int, attributes: Mapping[str, Any]) -> None:
        key = frozenset(attributes.items())
        with self._lock:
            self._totals[key] = self._totals.get(key, 0) + amount

    def observe(self, options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            totals = list(self._totals.items())
        return [Observation(total, dict(key)) for key, total in totals]

    def _forget(self) -> None:
        # Right after fork: one thread, and a lock the parent's collecting thread held
        # would never be released here.
        self._lock = threading.Lock()
        self._totals = {}


_all_counters: weakref.WeakSet[DeliveryCounter] = weakref.WeakSet()
_counter_of: weakref.WeakKeyDictionary[Meter, DeliveryCounter] = weakref.WeakKeyDictionary()


def _forget_all_in_child() -> None:
    for counter in list(_all_counters):
        counter._forget()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_all_in_child)


def _delivery_counter(meter: Meter) -> DeliveryCounter:
    try:
        found = _counter_of.get(meter)
    except TypeError:  # a Meter that cannot be weakly referenced: one counter per call
        found = None
    if found is not None:
        return found
    counter = DeliveryCounter()
    meter.create_observable_counter(
        MESSAGING_CLIENT_CONSUMED_MESSAGES,
        callbacks=[counter.observe],
        unit="{message}",
        description="Task messages a worker took: one per delivery, whatever ended it.",
    )
    try:
        _counter_of[meter] = counter
    except TypeError:
        pass
    return counter


@dataclass(frozen=True)
class Instruments:
    sent: Counter
    publish_duration: Histogram
    consumed: DeliveryCounter
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
            consumed=_delivery_counter(meter),
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
        if self.recording():  # as the SDK's proxies drop what comes before a provider
            self.consumed.add(1, attributes)
        if seconds is not None:
            # context: the task's trace, for the exemplar (the SDK's trace-based filter).
            self.process_duration.record(seconds, attributes, context=context)

    def waited(
        self, seconds: float, attributes: Mapping[str, Any], context: Context | None = None
    ) -> None:
        self.queue_time.record(seconds, attributes, context=context)

    def all(self) -> tuple[Counter | Histogram, ...]:
        """The SDK's synchronous instruments (forkmetrics.py; the DeliveryCounter forgets
        its totals in a forked child by itself)."""
        return (self.sent, self.publish_duration, self.process_duration, self.queue_time)
