"""metrics_worker_hostname: celery.worker.hostname kept, dropped or normalized on metric points; spans keep it."""

from __future__ import annotations

import runpy
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from celery.contrib.testing.worker import start_worker
from opentelemetry.trace import SpanKind

from otel_celery_headers import options
from otel_celery_headers.health import HEALTH_METRICS, worker_attributes
from tests.conftest import METRICS, instrument, make_app, wait_for
from tests.support.fixtures import clean_environment, our_log  # noqa: F401 - fixtures
from tests.support.prefork import prefork_worker
from tests.support.spans import attr, one

HOSTNAME = "celery.worker.hostname"
C = SpanKind.CONSUMER


#: celery@orders-7d9f8b6c5-x2x7q -> celery@orders (a pod's name minus its two hashes):
#: the normalizer docs/shape-and-volume.md shows, so the worker below runs the docs' code.
deployment: Callable[[str], str] = runpy.run_path(
    str(Path(__file__).resolve().parent.parent / "docs_src" / "shape_and_volume"
        / "deployment_hostname.py"))["deployment"]


class Counting:
    """deployment(), counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, hostname: str) -> str:
        self.calls += 1
        return deployment(hostname)


def test_rule_values_and_validation(monkeypatch):
    """keep (default), drop, a callable, or module:function in the variable; anything else raises."""
    assert options.load({}).metrics_worker_hostname == "keep"
    assert options.load({"metrics_worker_hostname": " DROP "}).metrics_worker_hostname == "drop"
    assert options.load({"metrics_worker_hostname": deployment}).metrics_worker_hostname is deployment
    monkeypatch.setenv("OTEL_PYTHON_CELERY_HEADERS_METRICS_WORKER_HOSTNAME",
                       "tests.test_metrics_hostname:deployment")
    assert options.load({}).metrics_worker_hostname is deployment
    monkeypatch.setenv("OTEL_PYTHON_CELERY_HEADERS_METRICS_WORKER_HOSTNAME", "drop")
    assert options.load({}).metrics_worker_hostname == "drop"
    for bad, reason in (("normalize", "expected keep, drop, or a callable"),
                        (42, "expected keep, drop, or a callable")):
        with pytest.raises(ValueError) as raised:
            options.load({"metrics_worker_hostname": bad})
        assert str(raised.value) == (
            f"otel-celery-headers: instrument(metrics_worker_hostname={bad!r}): {reason}"
        )


def test_worker_attributes_per_rule(our_log):
    """keep, drop, the callable's answer; a raising or non-str callable drops it, logged once."""
    name = "celery@orders-7d9f8b6c5-x2x7q"
    assert worker_attributes(name, "keep") == {HOSTNAME: name}
    assert worker_attributes(name, "drop") == {}
    assert worker_attributes(name, deployment) == {HOSTNAME: "celery@orders"}
    assert worker_attributes(name, lambda _: 1 / 0) == {}
    assert worker_attributes(name, lambda _: None) == {}  # type: ignore[arg-type, return-value]
    assert worker_attributes(name, lambda _: "") == {}
    assert [r.getMessage() for r in our_log()] == [
        "otel-celery-headers: error in metrics_worker_hostname callable ignored "
        "(the task is unaffected; further errors of this kind are not logged)",
        "otel-celery-headers: error in metrics_worker_hostname callable's answer ignored "
        "(the task is unaffected; further errors of this kind are not logged)",
    ]


def points_of(names: tuple[str, ...]) -> list[tuple[str, dict[str, Any]]]:
    data = METRICS.get_metrics_data()
    return [
        (metric.name, dict(point.attributes or {}))
        for resource in (data.resource_metrics if data else [])
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name in names
        for point in metric.data.data_points
    ]


def wait_until(predicate: Any, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := predicate()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return found


@pytest.mark.parametrize(("rule", "on_metrics"), [
    ("drop", None),
    (Counting(), "celery@orders"),
])
def test_in_process_worker_metrics_follow_the_rule_spans_keep_the_name(
    redis_url, monkeypatch, exporter, rule, on_metrics,
):
    """A threads worker named celery@orders-7d9f8b6c5-x2x7q: every health point has the rule's
    hostname (none for drop) and no other metric point has one; the process span keeps the name
    the task's request has (in an embedded worker Celery's fast trace path gives the machine's)."""
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "200")
    queue = f"hn-{uuid.uuid4().hex[:8]}"
    real = "celery@orders-7d9f8b6c5-x2x7q"
    instrumentor = instrument(metrics_worker_hostname=rule)
    try:
        app, _ = make_app(redis_url, task_default_queue=queue)

        @app.task(name="hn.whereami", bind=True, shared=False)
        def whereami(self: Any) -> str:
            return str(self.request.hostname)

        # The node name start_worker gives (Celery 5.3's start_worker takes no hostname=).
        monkeypatch.setattr("celery.contrib.testing.worker.anon_nodename", lambda *_: real)
        with start_worker(app, pool="threads", concurrency=2, perform_ping_check=False,
                          shutdown_timeout=60, loglevel="WARNING"):
            result = whereami.delay()
            seen = result.get(timeout=20)
            health = wait_until(lambda: (found := points_of(HEALTH_METRICS))
                                and {name for name, _ in found} == set(HEALTH_METRICS) and found)
            span = wait_for(lambda spans: one(spans, result.id, C))
        assert {name for name, _ in health} == set(HEALTH_METRICS)
        assert {a.get(HOSTNAME) for _, a in health} == {on_metrics}
        others = points_of(tuple({m.name for r in METRICS.get_metrics_data().resource_metrics
                                  for s in r.scope_metrics for m in s.metrics} - set(HEALTH_METRICS)))
        assert others and all(HOSTNAME not in a for _, a in others)
        assert seen and attr(span, HOSTNAME) == seen
        if isinstance(rule, Counting):  # once per worker, not per export
            assert rule.calls == 1
    finally:
        instrumentor.uninstrument()


def test_prefork_worker_drop_from_the_environment(redis_url, tmp_path):
    """A real `celery worker` (prefork, -c 2) with the variable set to drop: no exported metric point
    names the worker, and its process spans still do."""
    env = {"OTEL_METRIC_EXPORT_INTERVAL": "500",
           "OTEL_PYTHON_CELERY_HEADERS_METRICS_WORKER_HOSTNAME": "drop"}
    with prefork_worker(redis_url, tmp_path, concurrency=2, metrics=True, env=env) as w:
        app, t = make_app(redis_url, task_default_queue=w.queue)
        w.wait_ready(app)
        result = t.add.delay(2, 3)
        assert result.get(timeout=30) == 5
        span = w.wait_spans(lambda spans: [s for s in spans if s["name"] == "process t.add"])[0]
        health_seen = lambda: {p["name"] for p in w.metric_points()} >= set(HEALTH_METRICS)  # noqa: E731
        wait_until(health_seen, timeout=30)
        w.stop()
        points = w.metric_points()
    assert {p["name"] for p in points} >= {*HEALTH_METRICS, "messaging.process.duration"}
    assert [p for p in points if HOSTNAME in p["attributes"]] == []
    assert span["attributes"][HOSTNAME] == f"{w.queue}@localhost"
