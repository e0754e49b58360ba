"""App module for `celery -A tests.support.prometheus_app worker`: metrics for Prometheus to scrape.

The OpenTelemetry Prometheus exporter route (tests/test_monitoring.py): an SDK
MeterProvider with a ``PrometheusMetricReader`` whose ``prometheus_client`` HTTP
server listens on 127.0.0.1:PROM_PORT. Imported by the worker's main process before
the pool forks, so the server thread lives there, where deliveries and worker health
are recorded (deliveries.py, health.py); pool children inherit the listening socket
but run no thread that accepts on it, and forget their copy of our instruments
(forkmetrics.py). Environment: BROKER_URL, PROM_PORT.
"""

from __future__ import annotations

import os
import runpy
import time
from pathlib import Path

from celery import Celery

from otel_celery_headers import CeleryHeadersInstrumentor

# The setup docs/dashboards.md shows, run as it is, on a loopback port.
os.environ["METRICS_PORT"], os.environ["METRICS_ADDR"] = os.environ["PROM_PORT"], "127.0.0.1"
runpy.run_path(str(Path(__file__).resolve().parents[2] / "docs_src/monitoring/prometheus_exporter.py"))

app = Celery("prometheus_app", broker=os.environ["BROKER_URL"], backend=os.environ["BROKER_URL"])
app.conf.update(broker_connection_retry_on_startup=True, worker_hijack_root_logger=False)


@app.task(name="t.work")
def work(fail: bool) -> str:
    if fail:
        raise ValueError("asked to fail")
    return "ok"


@app.task(name="t.nap")
def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@app.task(name="t.stuck")
def stuck() -> None:
    """Sent with a hard time limit shorter than this: the pool kills the child."""
    time.sleep(60)


@app.task(name="t.die")
def die() -> None:
    """The pool child vanishes mid-task (an OOM kill looks the same): WorkerLostError."""
    os._exit(1)


CeleryHeadersInstrumentor().instrument()
