"""The Grafana dashboard of otel-celery-headers' metrics, as code.

Run ``python monitoring/grafana/dashboard.py`` to render ``celery.json`` beside it;
tests/test_monitoring.py checks that the committed JSON is this file's output and asks
every panel's query of a real Prometheus.

Series names are what the OpenTelemetry Prometheus exporter and the Collector's
``prometheus`` / ``prometheusremotewrite`` exporters give by default (dots to
underscores, unit suffix, ``_total`` on counters): docs/dashboards.md has the table.
Plain dicts rather than grafana-foundation-sdk: one dependency less, and the JSON
model is what Grafana imports anyway.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

CONSUMED = "messaging_client_consumed_messages_total"
PROCESS = "messaging_process_duration_seconds_bucket"
QUEUE_TIME = "celery_message_queue_time_seconds_bucket"
ACTIVE = "celery_worker_tasks_active"
RESERVED = "celery_worker_tasks_reserved"
POOL = "celery_worker_pool_size"
QUEUE_LENGTH = "celery_queue_length"

LOST = "billiard.exceptions.WorkerLostError"
TIME_LIMIT = "billiard.exceptions.TimeLimitExceeded"

TARGET = 'job=~"$job", instance=~"$instance"'
DELIVERY = TARGET + ', celery_task_name=~"$task", messaging_destination_name=~"$queue"'


def count_in_range(selector: str, window: str) -> str:
    """Per series, what a counter counted in ``window``, first occurrences included.

    ``increase()`` needs two samples, so a series that appears already counting (the
    first lost child of a worker's life appears at 1) is not counted by it: a series
    absent one window ago counts with its whole value instead.
    """
    return (
        f"(({selector} unless {selector} offset {window})"
        f" or round(increase({selector}[{window}])))"
    )


def _quantiles(metric: str, by: str) -> list[dict[str, str]]:
    return [
        {
            "expr": f"histogram_quantile({q}, sum by ({by}, le) "
            f"(rate({metric}{{{DELIVERY}}}[$__rate_interval])))",
            "legendFormat": f"p{round(q * 100)} {{{{{by}}}}}",
        }
        for q in (0.5, 0.95, 0.99)
    ]


def _panel(title: str, kind: str, targets: list[dict[str, str]], unit: str,
           description: str) -> dict[str, Any]:
    return {
        "title": title,
        "type": kind,
        "description": description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": {"type": "prometheus", "uid": "${datasource}"},
             **target}
            for i, target in enumerate(targets)
        ],
    }


def panels() -> list[dict[str, Any]]:
    failures = f'{CONSUMED}{{{DELIVERY}, celery_task_state="FAILURE"}}'
    deliveries = f"{CONSUMED}{{{DELIVERY}}}"
    killed = f'{CONSUMED}{{{DELIVERY}, error_type=~"{LOST}|{TIME_LIMIT}"}}'
    return [
        _panel("Task throughput by task", "timeseries", [{
            "expr": f"sum by (celery_task_name) (rate({deliveries}[$__rate_interval]))",
            "legendFormat": "{{celery_task_name}}",
        }], "reqps", "Deliveries a worker finished per second, whatever their outcome."),
        _panel("Task failures by task and error", "timeseries", [{
            "expr": f"sum by (celery_task_name, error_type) (rate({failures}[$__rate_interval]))",
            "legendFormat": "{{celery_task_name}} {{error_type}}",
        }], "reqps", "Deliveries that ended in FAILURE per second, by error.type."),
        _panel("Deliveries in range by task and state", "table", [{
            "expr": f"sum by (celery_task_name, celery_task_state) "
            f"({count_in_range(deliveries, '$__range')})",
            "format": "table", "instant": True,
        }], "short", "Deliveries over the dashboard's time range, by celery.task.state."),
        _panel("Failure ratio by task in range", "bargauge", [{
            # A task without failures reads 0, not nothing.
            "expr": f"(sum by (celery_task_name) ({count_in_range(failures, '$__range')})"
            f" or 0 * sum by (celery_task_name) ({count_in_range(deliveries, '$__range')}))"
            f" / sum by (celery_task_name) ({count_in_range(deliveries, '$__range')})",
            "legendFormat": "{{celery_task_name}}", "instant": True,
        }], "percentunit", "FAILURE deliveries over all deliveries of each task."),
        _panel("Process duration by task", "timeseries",
               _quantiles(PROCESS, "celery_task_name"), "s",
               "messaging.process.duration: from the start in the pool to the outcome."),
        _panel("Queue time by queue", "timeseries",
               _quantiles(QUEUE_TIME, "messaging_destination_name"), "s",
               "celery.message.queue_time: from publish (or eta) to the start in the pool."),
        _panel("Queue length by queue", "timeseries", [{
            # Every worker consuming a queue reports the same broker count: one per queue.
            "expr": f'max by (messaging_destination_name) '
            f'({QUEUE_LENGTH}{{{TARGET}, messaging_destination_name=~"$queue"}})',
            "legendFormat": "{{messaging_destination_name}}",
        }], "short", "Messages waiting in the broker (one value per queue, however many "
                     "workers consume it)."),
        _panel("Tasks per worker", "timeseries", [
            {"expr": f"sum by (celery_worker_hostname) ({ACTIVE}{{{TARGET}}})",
             "legendFormat": "active {{celery_worker_hostname}}"},
            {"expr": f"sum by (celery_worker_hostname) ({RESERVED}{{{TARGET}}})",
             "legendFormat": "reserved {{celery_worker_hostname}}"},
            {"expr": f"sum by (celery_worker_hostname) ({POOL}{{{TARGET}}})",
             "legendFormat": "pool {{celery_worker_hostname}}"},
        ], "short", "Executing, prefetched and not started, and pool processes of each worker."),
        _panel("Lost pool children and hard time limits in range", "table", [{
            "expr": f"sum by (celery_task_name, error_type) ({count_in_range(killed, '$__range')})",
            "format": "table", "instant": True,
        }], "short", "Deliveries whose pool child died (WorkerLostError) or was killed at "
                     "the hard time limit (TimeLimitExceeded)."),
        _panel("Workers that stopped reporting", "table", [{
            "expr": f"max by (job, celery_worker_hostname) "
            f"(last_over_time({POOL}{{{TARGET}}}[$__range])) > 0"
            f" unless on (job, celery_worker_hostname) {POOL}{{{TARGET}}}",
            "format": "table", "instant": True,
        }], "short", "Workers seen in the range whose last pool size was not 0 (not a "
                     "warm shutdown) and that report nothing now."),
    ]


def _variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "name": name, "label": label, "type": "query",
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        # A plain string, as celery-mixin's: what every Grafana version reads.
        "query": query, "definition": query, "refresh": 2, "sort": 1,
        "multi": True, "includeAll": True, "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
    }


def dashboard() -> dict[str, Any]:
    laid_out = []
    for index, panel in enumerate(panels()):
        panel = dict(panel, id=index + 1,
                     gridPos={"h": 8, "w": 12, "x": 12 * (index % 2), "y": 8 * (index // 2)})
        laid_out.append(panel)
    return {
        "uid": "otel-celery-headers",
        "title": "Celery (otel-celery-headers)",
        "tags": ["celery", "opentelemetry"],
        "timezone": "",
        "schemaVersion": 39,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "panels": laid_out,
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource",
             "query": "prometheus", "current": {}},
            _variable("job", "Job", f"label_values({POOL}, job)"),
            _variable("instance", "Instance", f'label_values({POOL}{{job=~"$job"}}, instance)'),
            _variable("queue", "Queue",
                      f'label_values({QUEUE_LENGTH}{{job=~"$job"}}, messaging_destination_name)'),
            _variable("task", "Task", f'label_values({CONSUMED}{{job=~"$job"}}, celery_task_name)'),
        ]},
        "annotations": {"list": []},
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    target = Path(__file__).with_name("celery.json")
    target.write_text(render())
    sys.stdout.write(f"wrote {target}\n")
