"""examples/django_celery end to end, run as its README says: a real Django project,
its web process and a prefork worker each under ``opentelemetry-instrument`` (the
Django, sqlite3 and our instrumentations, no tracing code in the project), a real
Redis, spans over OTLP/HTTP to a receiver this test runs.

Each request is its own trace, with exactly: Django's SERVER span, the INSERT, the
publish of ``process_order``, its CONSUMER span (child of the publish) with the
task's SELECT and UPDATE, the publish of ``notify_customer`` and its CONSUMER span
with one UPDATE. Spans are selected by name, kind, service and attributes, never by
position.
"""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.example import load
from tests.support.servers import free_port, wait_for_port
from tests.support.web_example import (
    EXAMPLES,
    Process,
    Span,
    children,
    instrument_command,
    otel_env,
    post_json,
    sql_statement,
    traceparent,
)

_receiver = load("otlp_receiver")
find, find_one = _receiver.find, _receiver.find_one

PROJECT = EXAMPLES / "django_celery"
REQUESTS = 3
PROCESS = "orders.tasks.process_order"
NOTIFY = "orders.tasks.notify_customer"
# What each request's trace holds once complete: (name, kind) -> count. The SQL
# spans are counted separately, by statement and parent.
SHAPE = {
    ("POST orders/", "SERVER"): 1,
    (f"send {PROCESS}", "PRODUCER"): 1,
    (f"process {PROCESS}", "CONSUMER"): 1,
    (f"send {NOTIFY}", "PRODUCER"): 1,
    (f"process {NOTIFY}", "CONSUMER"): 1,
}
SQL_PER_TRACE = 4  # INSERT (web); SELECT, UPDATE (process_order); UPDATE (notify)


@pytest.fixture(scope="module")
def receiver() -> Iterator[Any]:
    with _receiver.OTLPReceiver() as running:
        yield running


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file (``manage.py migrate``, as the README says)."""
    path = tmp_path_factory.mktemp("django") / "db.sqlite3"
    env = otel_env("http://127.0.0.1:9", "unused", DJANGO_SETTINGS_MODULE="proj.settings",
                   DJANGO_DB_PATH=str(path))
    import subprocess

    done = subprocess.run([sys.executable, "manage.py", "migrate", "--noinput"], cwd=PROJECT,
                          env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return path


def _env(receiver: Any, service: str, redis_url: str, database: Path, **extra: str) -> dict[str, str]:
    return otel_env(receiver.http_endpoint, service, DJANGO_SETTINGS_MODULE="proj.settings",
                    CELERY_BROKER_URL=redis_url, DJANGO_DB_PATH=str(database), **extra)


@pytest.fixture(scope="module")
def worker(receiver: Any, redis_url: str, database: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    proc = Process(
        "worker",
        [instrument_command(), "celery", "-A", "proj", "worker", "--pool", "prefork", "-c", "2",
         "--loglevel", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat"],
        PROJECT, _env(receiver, "orders-worker", redis_url, database),
        tmp_path_factory.mktemp("worker-log"))
    try:
        proc.wait_log(" ready.", 60)
        yield proc
    finally:
        proc.stop()


WEB_SERVERS = {
    # The autoreloader would run the project in a child process the instrumentation
    # never saw: --noreload.
    "runserver": lambda port: [sys.executable, "manage.py", "runserver", "--noreload",
                               f"127.0.0.1:{port}"],
    # Two forked workers: the SDK's span processor restarts its thread in each.
    "gunicorn": lambda port: ["gunicorn", "proj.wsgi", "--bind", f"127.0.0.1:{port}",
                              "--workers", "2"],
}


@pytest.fixture(scope="module", params=sorted(WEB_SERVERS))
def web(request: pytest.FixtureRequest, receiver: Any, redis_url: str, database: Path,
        worker: Process, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    proc = Process(request.param, [instrument_command(), *WEB_SERVERS[request.param](port)],
                   PROJECT, _env(receiver, "orders-web", redis_url, database),
                   tmp_path_factory.mktemp("web-log"))
    try:
        wait_for_port(port, 60, proc.proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


def _complete(spans: list[Span]) -> bool:
    shape_done = all(len(find(spans, name=name, kind=kind)) >= count
                     for (name, kind), count in SHAPE.items())
    return shape_done and len(_sql(spans)) >= SQL_PER_TRACE


def _sql(spans: list[Span]) -> list[Span]:
    return find(spans, kind="CLIENT", attributes={"db.system": "sqlite"})


def _verb(span: Span) -> str:
    return sql_statement(span).split()[0].upper()


def test_one_trace_per_request(web: str, receiver: Any, database: Path) -> None:
    placed = []
    for n in range(REQUESTS):
        trace_id, caller, header = traceparent()
        status, body = post_json(f"{web}/orders/", {"item": f"teapot {n}", "quantity": n + 1},
                                 {"traceparent": header})
        assert status == 202 and body["status"] == "placed", body
        placed.append((trace_id, caller, body))

    for trace_id, caller, body in placed:
        receiver.wait_for_trace(trace_id, _complete, 30)
    receiver.wait_quiet(1.0, 15)  # anything extra would have arrived by now

    for trace_id, caller, body in placed:
        spans = receiver.spans(trace_id)
        counts = {key: len(find(spans, name=key[0], kind=key[1])) for key in SHAPE}
        assert counts == SHAPE, counts
        assert len(spans) == len(SHAPE) + SQL_PER_TRACE, sorted(s["name"] for s in spans)

        server = find_one(spans, kind="SERVER")
        assert server["service.name"] == "orders-web"
        assert server["parent_span_id"] == caller  # continues the caller's trace
        assert server["attributes"]["http.route"] == "orders/"
        assert [_verb(s) for s in children(spans, server, kind="CLIENT")] == ["INSERT"]

        send = find_one(spans, name=f"send {PROCESS}", kind="PRODUCER")
        assert send["service.name"] == "orders-web"
        assert send["parent_span_id"] == server["span_id"]
        assert send["attributes"]["messaging.destination.name"] == "orders"

        process = find_one(spans, name=f"process {PROCESS}", kind="CONSUMER")
        assert process["service.name"] == "orders-worker"
        assert process["parent_span_id"] == send["span_id"]
        assert process["attributes"]["celery.task.state"] == "SUCCESS"
        assert sorted(_verb(s) for s in children(spans, process, kind="CLIENT")) == \
            ["SELECT", "UPDATE"]

        follow_up = find_one(spans, name=f"send {NOTIFY}", kind="PRODUCER")
        assert follow_up["service.name"] == "orders-worker"
        assert follow_up["parent_span_id"] == process["span_id"]
        notify = find_one(spans, name=f"process {NOTIFY}", kind="CONSUMER")
        assert notify["parent_span_id"] == follow_up["span_id"]
        assert notify["attributes"]["celery.task.state"] == "SUCCESS"
        assert [_verb(s) for s in children(spans, notify, kind="CLIENT")] == ["UPDATE"]

    # And the tasks did their work: every order went placed -> processed -> notified.
    with sqlite3.connect(database) as db:
        ids = [body["id"] for _, _, body in placed]
        rows = db.execute(f"SELECT status FROM orders_order WHERE id IN ({','.join('?' * len(ids))})",
                          ids).fetchall()
    assert [status for (status,) in rows] == ["notified"] * REQUESTS
