"""Beside Sentry's Celery integration (issue 18): producer and worker both run Sentry and us.

Both orders of initialisation, real Redis, a worker subprocess with Sentry initialised in
it, its DSN pointed at a loopback endpoint that collects the envelopes. The producer
publishes inside a Sentry transaction, as a web request does.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.coexist import (
    TASKS,
    assert_every_run,
    published,
    run_producer,
    sink,
    transactions,
)
from tests.support.prefork import ROOT
from tests.support.reliability import wait_until


@pytest.fixture(scope="module", params=["theirs-first", "ours-first"])
def coexisting(request: Any, redis_url: str, tmp_path_factory: Any) -> Iterator[Any]:
    order = request.param
    with sink() as server:
        tmp_path: Path = tmp_path_factory.mktemp(f"sentry-{order}")
        runs, spans, published_file = run_producer(
            redis_url, tmp_path, "sentry", order, {"SENTRY_DSN": f"http://key@127.0.0.1:{server.port}/1"})
        yield runs, spans, published_file, server


def worker_transactions(server: Any, count: int) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(envelope header, transaction) of Sentry's worker transactions, once ``count`` have arrived."""
    def found() -> list[Any] | None:
        tasks = [(header, event) for header, event in transactions(server)
                 if event["contexts"]["trace"].get("op") == "queue.task.celery"]
        return tasks if len(tasks) >= count else None
    return wait_until(found, 30, f"{count} Sentry worker transactions")


def test_our_traces_keep_their_shape(coexisting):
    """A delay, a chain of 2, a group of 3 and a retry, with and without caller baggage: our spans as without Sentry,
    and the task's OpenTelemetry baggage exactly the caller's (none of Sentry's members)."""
    runs, spans, _, _ = coexisting
    assert_every_run(runs, spans)


def test_sentry_headers_arrive_unchanged(coexisting):
    """Sentry's sentry-trace and baggage, as its wrapper of apply_async wrote them, are what the task gets."""
    runs, _, published_file, _ = coexisting
    built = published(published_file, "built")
    for run in runs:
        for report in run["reports"]:
            sentry = built[report["id"]]
            assert sentry["nested"]["sentry-trace"] and "sentry-trace_id=" in sentry["nested"]["baggage"]
            # Where Sentry reads them (task.request.headers, its nested copy): byte for byte.
            assert {k: report["nested"][k] for k in ("sentry-trace", "baggage")} == {
                k: sentry["nested"][k] for k in ("sentry-trace", "baggage")}
            # Its top-level copies: sentry-trace always; baggage unless the caller had
            # OpenTelemetry baggage, which takes the top-level baggage header.
            assert report["top"]["sentry-trace"] == sentry["top"]["sentry-trace"]
            assert report["top"]["baggage"] == ("tenant=acme" if run["baggage"] else sentry["top"]["baggage"])
            assert report["top"]["otel_celery_context"] == (
                "traceparent baggage" if run["baggage"] else "traceparent")


def test_sentry_worker_transactions_join_its_trace(coexisting):
    """Each task's Sentry transaction continues the web request's Sentry trace, under the span its header
    named, with the request's dynamic sampling context."""
    runs, _, published_file, server = coexisting
    built = published(published_file, "built")
    # One per message: a retry's second attempt has a transaction of its own.
    tasks = worker_transactions(server, sum(TASKS[run["shape"]][1] for run in runs))
    requests = {event["contexts"]["trace"]["trace_id"]: header for header, event in transactions(server)
                if event["contexts"]["trace"].get("op") == "http.server"}
    for run in runs:
        request_dsc = requests[run["sentry_trace_id"]]["trace"]
        assert request_dsc["trace_id"] == run["sentry_trace_id"] and request_dsc["sample_rate"] == "1.0"
        for report in run["reports"]:
            trace_id, parent_span_id, _ = built[report["id"]]["nested"]["sentry-trace"].split("-")
            (header, event), = [(h, e) for h, e in tasks if e["tags"]["celery_task_id"] == report["id"]
                                and e["contexts"]["trace"]["parent_span_id"] == parent_span_id]
            assert event["contexts"]["trace"]["trace_id"] == run["sentry_trace_id"] == trace_id
            assert header["trace"] == request_dsc


def test_without_another_vendor_the_shape_is_the_same(redis_url, tmp_path):
    """The control: the same producer and worker with neither Sentry nor ddtrace give the shapes asserted above."""
    runs, spans, _ = run_producer(redis_url, tmp_path, "none", "theirs-first", {})
    assert_every_run(runs, spans)
    # task.request.headers: Celery's copy of the top-level custom headers, ours only.
    for run in runs:
        for report in run["reports"]:
            assert set(report["nested"]) == {
                "traceparent", "otel_celery_context", "otel_celery_sent_at",
                *(["baggage"] if run["baggage"] else []),
                *(["otel_celery_previous_attempt"] if run["shape"] == "retry" else [])}


# A fresh interpreter: ours imported and instrumented first, then Sentry, then the worker's
# Consumer module imported as `celery worker` imports it when it starts. EARLY: the
# Consumer module imported before sentry_sdk.init() (by the user), the limit of Sentry's
# integration that docs/coexistence.md describes.
_OURS_THEN_SENTRY = """
import os
if os.environ.get("EARLY"):
    import celery.worker.consumer.consumer
from otel_celery_headers import CeleryHeadersInstrumentor
CeleryHeadersInstrumentor().instrument()
import sentry_sdk
from sentry_sdk.integrations.celery import CeleryIntegration
sentry_sdk.init(dsn="http://key@127.0.0.1:9/1", integrations=[CeleryIntegration()],
                default_integrations=False, auto_enabling_integrations=False)
import celery.app.trace
import celery.worker.consumer.consumer as consumer
import wrapt
print(consumer.build_tracer is celery.app.trace.build_tracer,
      isinstance(vars(consumer.Consumer)["on_unknown_task"], wrapt.FunctionWrapper))
"""


@pytest.mark.parametrize(("early", "sentrys_tracer"), [(False, True), (True, False)])
def test_sentry_initialised_after_us_still_traces_a_solo_worker(early, sentrys_tracer):
    """Imported and instrumented before sentry_sdk.init(), we leave Celery's worker Consumer module
    unimported: the tracer it builds for a solo/threads/gevent worker is Sentry's patched build_tracer
    (unless the user imported that module before sentry_sdk.init()), and our wraps of the Consumer
    are in place once the worker imports it."""
    proc = subprocess.run([sys.executable, "-c", _OURS_THEN_SENTRY], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "EARLY": "1" if early else ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == [str(sentrys_tracer), "True"]
