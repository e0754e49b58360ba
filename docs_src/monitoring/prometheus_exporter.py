"""In the module `celery -A` names, before the pool forks: the worker's metrics on :9464/metrics."""

import os

from opentelemetry import metrics
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import start_http_server

start_http_server(
    port=int(os.environ.get("METRICS_PORT", "9464")),
    addr=os.environ.get("METRICS_ADDR", "0.0.0.0"),
)
metrics.set_meter_provider(MeterProvider(metric_readers=[PrometheusMetricReader()]))
