"""The feature pages' samples (docs_src/arguments, shape_and_volume, logs, quiet) run as
written, and do what the page says right beside them.

A sample that only calls instrument() runs here, with runpy, on the session's SDK
(conftest's global TracerProvider) and is undone after its test. A sample that needs
process-wide state the session must not share (a global MeterProvider, a LoggerProvider,
its own Celery app and tasks) runs in a process of its own: a `celery worker` subprocess
(tests/support/prefork.py) whose app module runs the sample, or
tests/support/docs_samples.py.
"""

from __future__ import annotations

import functools
import re
import runpy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from opentelemetry.trace import SpanKind

from otel_celery_headers import CeleryHeadersInstrumentor, options
from otel_celery_headers.arguments import ARGS, KWARGS
from otel_celery_headers.health import HEALTH_METRICS, worker_attributes
from tests.conftest import make_app, wait_for, worker
from tests.support.docs_samples import run_sample
from tests.support.fixtures import clean_environment  # noqa: F401 - fixture
from tests.support.log_file import read_log_records
from tests.support.prefork import prefork_worker
from tests.support.spans import attr, by_message, one, parent_id, span_id, trace_id

P, C = SpanKind.PRODUCER, SpanKind.CONSUMER
DOCS_SRC = Path(__file__).resolve().parent.parent / "docs_src"
HOSTNAME = "celery.worker.hostname"


@contextmanager
def instrumented_by(sample: str) -> Iterator[dict[str, Any]]:
    """docs_src/<sample> run as a script (its instrument() call), uninstrumented after."""
    namespace = runpy.run_path(str(DOCS_SRC / sample))
    try:
        yield namespace
    finally:
        CeleryHeadersInstrumentor().uninstrument()


@pytest.fixture(scope="module")
def env(redis_url: str) -> Iterator[SimpleNamespace]:
    """A solo worker on Redis with the tasks the samples name."""
    app, _tasks = make_app(redis_url, task_default_queue="docs-samples")
    task = functools.partial(app.task, shared=False)

    @task(name="accounts.login")
    def login(user: str, profile: dict[str, Any], **extra: Any) -> str:
        return user

    @task(name="billing.refund")
    def refund(order_id: int, **payment: str) -> int:
        return order_id

    @task(name="accounts.logout")
    def logout(user: str) -> str:
        return user

    @task(name="thumbnails.make")
    def thumbnail(image_id: int) -> int:
        return image_id

    with worker(app):
        yield SimpleNamespace(app=app, login=login, refund=refund, logout=logout,
                              thumbnail=thumbnail)


def both_spans(exporter: Any, task_id: str) -> tuple[Any, Any]:
    """(send, process) spans of one message, once the process span has ended."""
    process = wait_for(lambda spans: one(spans, task_id, C))
    return one(exporter.get_finished_spans(), task_id, P), process


# -- docs/arguments.md ----------------------------------------------------------------


def test_record_arguments_sample_records_and_redacts_on_both_spans(env, exporter):
    """docs_src/arguments/record_arguments.py: accounts.login (by name) and billing.*
    (by glob) show their arguments on the send and process spans, the table's example
    exactly, `api_key` always redacted, `iban` anywhere in a key and `card_*` as a whole
    key; a task the sample does not name shows none."""
    with instrumented_by("arguments/record_arguments.py"):
        login = env.login.delay("alice", {"plan": "pro"}, api_key="k", note="hi")
        refund = env.refund.delay(7, payer_iban="DE89370400440532013000",
                                  card_number="4111111111111111", my_card_number="1234")
        logout = env.logout.delay("alice")
        assert (login.get(timeout=20), refund.get(timeout=20), logout.get(timeout=20)) == (
            "alice", 7, "alice")
        spans = {r: both_spans(exporter, r.id) for r in (login, refund, logout)}
    expected = {
        login: ("['alice', {'plan': 'pro'}]", "{'api_key': '[REDACTED]', 'note': 'hi'}"),
        refund: ("[7]", "{'payer_iban': '[REDACTED]', 'card_number': '[REDACTED]', "
                        "'my_card_number': '1234'}"),
        logout: (None, None),
    }
    for result, (args, kwargs) in expected.items():
        for span in spans[result]:
            assert (attr(span, ARGS), attr(span, KWARGS)) == (args, kwargs), span.name


# -- docs/shape-and-volume.md -----------------------------------------------------------


def test_drop_worker_hostname_sample_in_a_prefork_worker(redis_url, tmp_path):
    """docs_src/shape_and_volume/drop_worker_hostname.py as a prefork worker's setup:
    every health metric is exported and no metric point names the worker; its process
    span still does."""
    env = {"DOCS_SAMPLE": str(DOCS_SRC / "shape_and_volume" / "drop_worker_hostname.py")}
    with prefork_worker(redis_url, tmp_path, concurrency=1, metrics=True, env=env) as w:
        app, t = make_app(redis_url, task_default_queue=w.queue)
        w.wait_ready(app)
        assert t.add.delay(2, 3).get(timeout=30) == 5
        (span,) = w.wait_spans(lambda spans: [s for s in spans if s["name"] == "process t.add"])
        w.wait_spans(lambda _: {p["name"] for p in w.metric_points()} >= set(HEALTH_METRICS))
        w.stop()
        points = w.metric_points()
    assert {p["name"] for p in points} >= {*HEALTH_METRICS, "messaging.process.duration"}
    assert [p for p in points if HOSTNAME in p["attributes"]] == []
    assert span["attributes"][HOSTNAME] == f"{w.queue}@localhost"


def test_deployment_hostname_sample_maps_pod_names_to_their_deployment():
    """docs_src/shape_and_volume/deployment_hostname.py: a Deployment's pod name minus its
    ReplicaSet and pod hashes, also for a Deployment name with dashes; as the option's
    callable it is what health metric points carry."""
    deployment = runpy.run_path(str(DOCS_SRC / "shape_and_volume" / "deployment_hostname.py"))[
        "deployment"]
    assert deployment("celery@orders-7d9f8b6c5-x2x7q") == "celery@orders"
    assert deployment("emails@billing-api-5c4d8f9b7-abcde") == "emails@billing-api"
    rule = options.load({"metrics_worker_hostname": deployment}).metrics_worker_hostname
    assert worker_attributes("celery@orders-7d9f8b6c5-x2x7q", rule) == {HOSTNAME: "celery@orders"}


def test_fan_out_as_links_sample_gives_each_task_a_trace_linked_to_its_send_span(redis_url):
    """docs_src/shape_and_volume/fan_out_as_links.py: resize_all() of five images in a
    request: the request's trace holds the request and one send span per image; each
    process span is the root of a trace of its own with one link, to its send span."""
    spans = run_sample("link", CELERY_BROKER_URL=redis_url)
    assert isinstance(spans, list)
    (request,) = [s for s in spans if s["name"] == "POST /albums/1/resize"]
    in_request = sorted(s["name"] for s in spans if s["trace_id"] == request["trace_id"])
    assert in_request == ["POST /albums/1/resize", *["send images.resize"] * 5]
    send_of = {s["attributes"]["messaging.message.id"]: s for s in spans if s["kind"] == "PRODUCER"}
    processes = [s for s in spans if s["name"] == "process images.resize"]
    assert sorted(s["attributes"]["messaging.message.id"] for s in processes) == sorted(send_of)
    assert len({s["trace_id"] for s in processes}) == 5
    for process in processes:
        send = send_of[process["attributes"]["messaging.message.id"]]
        assert process["parent_id"] is None and process["trace_id"] != request["trace_id"]
        assert process["links"] == [send["span_id"]]
        assert process["attributes"]["celery.trace_shape"] == "link"


def test_beat_entry_sample_sends_the_header_and_its_task_is_a_linked_trace(redis_url):
    """docs_src/shape_and_volume/beat_entry_link.py, its entry sent by a real
    celery.beat.Scheduler: the message carries TRACE_SHAPE_HEADER "link"; the send span
    is the root of the run's trace, the task's span a root of its own linked to it."""
    result = run_sample("beat", CELERY_BROKER_URL=redis_url)
    assert isinstance(result, dict)
    task_id = result["task_id"]
    assert result["headers"] == [
        {"id": task_id, "task": "reports.nightly", "otel_celery_trace_shape": "link"}]
    (send,) = [s for s in result["spans"] if s["name"] == "send reports.nightly"]
    (process,) = [s for s in result["spans"] if s["name"] == "process reports.nightly"]
    assert send["parent_id"] is None and send["attributes"]["celery.beat.entry"] == "nightly-report"
    assert process["parent_id"] is None and process["trace_id"] != send["trace_id"]
    assert process["links"] == [send["span_id"]]
    assert process["attributes"]["messaging.message.id"] == task_id
    assert process["attributes"]["celery.trace_shape"] == "link"


def test_no_publish_span_sample_makes_one_span_per_selected_task(env, exporter, tracer):
    """docs_src/shape_and_volume/no_publish_span.py: a thumbnails.* task gets no send
    span, its process span is the caller's child; another task keeps its send span."""
    with instrumented_by("shape_and_volume/no_publish_span.py"):
        with tracer.start_as_current_span("request") as request:
            quiet = env.thumbnail.delay(3)
            other = env.logout.delay("bob")
        assert (quiet.get(timeout=20), other.get(timeout=20)) == (3, "bob")
        process = wait_for(lambda spans: one(spans, quiet.id, C))
        send, other_process = both_spans(exporter, other.id)
    spans = exporter.get_finished_spans()
    assert by_message(spans, quiet.id, P) == []
    assert [s.name for s in spans if s.name.startswith("send thumbnails")] == []
    assert parent_id(process) == span_id(request) and trace_id(process) == trace_id(request)
    assert parent_id(other_process) == span_id(send) and parent_id(send) == span_id(request)


# -- docs/logs.md ---------------------------------------------------------------------

#: docs_src/logs/celery_app.py's worker_log_format, parsed.
LINE = re.compile(r"^\[(?P<time>.+?): (?P<level>[A-Z]+)/(?P<process>[^\]]+)\] "
                  r"trace_id=(?P<trace>\w+) span_id=(?P<span>\w+) (?P<message>.*)$")


def test_logs_sample_lines_and_records_carry_the_tasks_trace(redis_url, tmp_path, exporter,
                                                             tracer, producer_side):
    """docs_src/logs/celery_app.py as a prefork worker's app: the task's own line and
    "succeeded" (pool child) carry the task's process span, "received" (main process)
    the producer's send span, "ready." no trace; the logs bridge's records the same."""
    records_file = tmp_path / "log-records.jsonl"
    env = {"CELERY_BROKER_URL": redis_url, "LOG_RECORD_FILE": str(records_file)}
    with prefork_worker(redis_url, tmp_path, concurrency=1,
                        app_module="tests.support.logs_sample_app", env=env) as w:
        app, t = make_app(redis_url, task_default_queue=w.queue)
        w.wait_ready(app)
        with tracer.start_as_current_span("request") as request:
            sent = t.log_line.delay("hello")
        (process,) = w.wait_spans(lambda spans: [
            s for s in spans if s["attributes"].get("messaging.message.id") == sent.id])
        w.wait_spans(lambda _: "succeeded in" in w.log())
        w.stop()
        log = w.log()
    lines = [m.groupdict() for m in map(LINE.match, log.splitlines()) if m]
    records = read_log_records(records_file)
    trace = format(trace_id(request), "032x")
    send = format(span_id(one(exporter.get_finished_spans(), sent.id, P)), "016x")
    expected = {
        f"Task t.log_line[{sent.id}] received": ("MainProcess", trace, send),
        "task says hello": ("ForkPoolWorker", trace, process["span_id"]),
        f"Task t.log_line[{sent.id}] succeeded in": ("ForkPoolWorker", trace, process["span_id"]),
        f"{w.queue}@localhost ready.": ("MainProcess", "0", "0"),
    }
    for fragment, (where, trace_hex, span_hex) in expected.items():
        (line,) = [line for line in lines if fragment in line["message"]]
        assert line["process"].startswith(where), (fragment, line)
        assert (line["trace"], line["span"]) == (trace_hex, span_hex), fragment
        (record,) = [r for r in records if fragment in r["body"]]
        assert (record["trace_id"], record["span_id"]) == (
            trace_hex.zfill(32), span_hex.zfill(16)), fragment


# -- docs/quiet.md --------------------------------------------------------------------


def test_traffic_traced_sample_brings_the_workers_redis_commands_back(redis_url, tmp_path,
                                                                     exporter, producer_side):
    """docs_src/quiet/traffic_traced.py in a prefork worker with
    opentelemetry-instrumentation-redis: the worker's own Redis commands are root spans
    again, each a trace of its own (the one task's unacked bookkeeping, ZADD HSET, and its
    acknowledgement, ZREM HDEL, once each), all from the main process; the task's span is
    still its producer's child."""
    env = {"DOCS_SAMPLE": str(DOCS_SRC / "quiet" / "traffic_traced.py"), "SPAN_DELAY_MS": "100"}
    with prefork_worker(redis_url, tmp_path, concurrency=1, app_module="tests.support.quiet_app",
                        env=env) as w:
        app, t = make_app(redis_url, task_default_queue=w.queue)
        w.wait_ready(app)
        result = t.add.delay(1, 1)
        assert result.get(timeout=30) == 2
        w.stop()  # the main process exports what it has as it exits
        spans = w.spans()
    (process,) = [s for s in spans if s["kind"] == "CONSUMER"]
    roots = [s for s in spans if s["parent_id"] is None]
    assert {(s["attributes"].get("db.system"), s["pid"]) for s in roots} == {("redis", w.proc.pid)}
    names = [s["name"] for s in roots]
    assert (names.count("ZADD HSET"), names.count("ZREM HDEL")) == (1, 1), sorted(names)
    assert process["parent_id"] == format(span_id(one(exporter.get_finished_spans(), result.id, P)), "016x")
