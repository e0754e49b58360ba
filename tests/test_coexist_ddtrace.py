"""Beside ddtrace's Celery patch (issue 18): producer and worker both run ddtrace and us.

``ddtrace.patch(celery=True)`` with its distributed tracing on, both orders of
initialisation, real Redis, a worker subprocess with ddtrace in it; its agent URL is a
loopback endpoint, and its telemetry and remote configuration are off, so nothing leaves
the machine. ddtrace writes W3C ``traceparent``/``tracestate`` (``dd=...``) and
``x-datadog-*`` into the nested ``headers["headers"]`` dict.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.coexist import assert_every_run, published, run_producer, sink

DATADOG = ("x-datadog-trace-id", "x-datadog-parent-id", "traceparent", "tracestate")


@pytest.fixture(scope="module", params=["theirs-first", "ours-first"])
def coexisting(request: Any, redis_url: str, tmp_path_factory: Any) -> Iterator[Any]:
    order = request.param
    with sink() as agent:
        tmp_path: Path = tmp_path_factory.mktemp(f"ddtrace-{order}")
        env = {
            "DD_TRACE_AGENT_URL": f"http://127.0.0.1:{agent.port}",
            "DD_CELERY_DISTRIBUTED_TRACING": "true",
            "DD_INSTRUMENTATION_TELEMETRY_ENABLED": "false",
            "DD_REMOTE_CONFIGURATION_ENABLED": "false",
            "DD_CRASHTRACKING_ENABLED": "false",
            "DD_TRACE_STARTUP_LOGS": "false",
            "DD_RUNTIME_METRICS_ENABLED": "false",
            "DD_DOGSTATSD_URL": f"udp://127.0.0.1:{agent.port}",
            "DD_SERVICE": "coexist",
        }
        runs, spans, published_file = run_producer(redis_url, tmp_path, "ddtrace", order, env)
        yield runs, spans, published_file, agent


def test_our_traces_keep_their_shape(coexisting):
    """A delay, a chain of 2, a group of 3 and a retry, with and without caller baggage: our spans as without ddtrace,
    and the task's OpenTelemetry baggage exactly the caller's."""
    runs, spans, _, _ = coexisting
    assert_every_run(runs, spans)


def test_ddtrace_headers_arrive_and_stay_theirs(coexisting):
    """ddtrace's nested headers reach the task as they left the producer; our trace state never has dd=."""
    runs, _, published_file, _ = coexisting
    sent = published(published_file, "sent")
    for run in runs:
        for report in run["reports"]:
            theirs = sent[report["id"]]["nested"]
            assert theirs["tracestate"].startswith("dd=") and theirs["x-datadog-trace-id"]
            assert {k: report["nested"][k] for k in DATADOG} == {k: theirs[k] for k in DATADOG}
            # ddtrace's trace is not ours: another trace id, and none of its state in ours.
            assert theirs["traceparent"].split("-")[1] != run["trace_id"]
            assert "dd=" not in report["tracestate"]
            assert report["top"]["tracestate"] is None
            assert report["top"]["otel_celery_context"] == (
                "traceparent baggage" if run["baggage"] else "traceparent")


def test_ddtrace_reached_only_the_loopback_agent(coexisting):
    """ddtrace sent its traces to the local endpoint standing in for its agent."""
    _, _, _, agent = coexisting
    assert any("/traces" in path for path, _ in agent.received())
