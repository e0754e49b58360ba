"""App module of the fleet's workers (`celery -A tests.support.fleet_app worker`), and
its producer (`python -m tests.support.fleet_app COUNT RATE`).

Environment: FLEET_HOST (the host's name, also its ``service.name``), BROKER_URL,
LEDGER_URL (a Redis on the observer host), OTLP_URL (the receiver's base URL: spans
and metrics over OTLP/HTTP), QUEUE, WORK_MS (how long a task runs), HEARTBEAT (AMQP
heartbeat, seconds).

The ledger is the ground truth the test compares the telemetry with, written over
links the test never cuts: ``published`` (the producer's task ids, in order),
``received:<host>`` (ids whose message the host's main process took, from
``task_received``), ``finished:<host>`` (id -> runs the host's pool finished) and
``finished-at:<host>`` (id -> when its last run there finished, epoch seconds).
"""

from __future__ import annotations

import os
import sys
import time

import redis
from celery import Celery, signals
from opentelemetry import metrics, trace
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from otel_celery_headers import CeleryHeadersInstrumentor

HOST = os.environ["FLEET_HOST"]
OTLP_URL = os.environ["OTLP_URL"]
TASK = "fleet.work"

resource = Resource.create({"service.name": HOST})
tracer_provider = TracerProvider(resource=resource)
tracer_provider.add_span_processor(BatchSpanProcessor(
    OTLPSpanExporter(endpoint=f"{OTLP_URL}/v1/traces"), schedule_delay_millis=500))
trace.set_tracer_provider(tracer_provider)
# The queue-length thread asks the broker as often as metrics are exported: it reads
# OTEL_METRIC_EXPORT_INTERVAL, which the launcher sets to this reader's interval.
metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=[
    PeriodicExportingMetricReader(
        OTLPMetricExporter(endpoint=f"{OTLP_URL}/v1/metrics"),
        export_interval_millis=int(os.environ["OTEL_METRIC_EXPORT_INTERVAL"]),
    ),
]))

ledger = redis.Redis.from_url(os.environ["LEDGER_URL"], socket_timeout=10)

app = Celery("fleet", broker=os.environ["BROKER_URL"])
app.conf.update(
    task_default_queue=os.environ["QUEUE"],
    task_ignore_result=True,
    # At-least-once: a message is acknowledged after its task ran, and a delivery
    # whose pool child died is requeued (celery docs, "Should I use retry or
    # acks_late?"): the settings under which a host's death must lose no task.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    # Celery's default prefetch (4 per pool child): a dead host strands up to 8
    # messages, and the survivor holds each for well under the visibility timeout.
    worker_prefetch_multiplier=4,
    broker_connection_retry_on_startup=True,
    broker_connection_max_retries=None,
    # A link that goes down carries no FIN or RST: the AMQP heartbeat is how both
    # ends notice (after two missed beats), here within about 10 s.
    broker_heartbeat=float(os.environ.get("HEARTBEAT", "5")),
    broker_transport_options={
        # kombu's Redis transport redelivers an unacknowledged message once it has
        # been unacknowledged this long; tasks run for WORK_MS, far less.
        "visibility_timeout": 10,
        # Sweep for such messages every second (kombu 5.7's interval x throttle;
        # older kombu ignores both: the fleet runs in tox's celery5 env, the newest).
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    },
)


@app.task(name=TASK, bind=True)
def work(self: object, index: int) -> int:
    time.sleep(int(os.environ.get("WORK_MS", "20")) / 1000)
    # Recorded after the work, as a task's own side effect would be: a run killed
    # before this line did not happen as far as the ledger knows.
    task_id = self.request.id  # type: ignore[attr-defined]
    ledger.pipeline().hincrby(f"finished:{HOST}", task_id, 1) \
        .zadd(f"finished-at:{HOST}", {task_id: time.time()}).execute()
    return index


@signals.task_received.connect(weak=False)
def _received(request: object = None, **_: object) -> None:
    ledger.hset(f"received:{HOST}", request.id, "1")  # type: ignore[attr-defined]


CeleryHeadersInstrumentor().instrument()


def produce(count: int, rate: float) -> None:
    """Publish ``count`` tasks at ``rate`` per second, each in a trace of its own."""
    start = time.monotonic()
    for index in range(count):
        delay = start + index / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        task_id = app.send_task(TASK, args=(index,)).id
        ledger.rpush("published", task_id)
    tracer_provider.shutdown()
    metrics.get_meter_provider().shutdown()  # type: ignore[attr-defined]


if __name__ == "__main__":
    produce(int(sys.argv[1]), float(sys.argv[2]))
