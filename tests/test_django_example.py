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

import shutil
import sqlite3
import subprocess
import sys
import urllib.error
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.example import load
from tests.support.servers import free_port, redis_server, wait_for_port
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
    done = subprocess.run([sys.executable, "manage.py", "migrate", "--noinput"], cwd=PROJECT,
                          env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return path


def _env(receiver: Any, service: str, redis_url: str, database: Path, *,
         settings_module: bool = True, **extra: str) -> dict[str, str]:
    """The README's environment; DJANGO_SETTINGS_MODULE exported unless told."""
    if settings_module:
        extra["DJANGO_SETTINGS_MODULE"] = "proj.settings"
    return otel_env(receiver.http_endpoint, service, CELERY_BROKER_URL=redis_url,
                    DJANGO_DB_PATH=str(database), **extra)


def _worker_argv(concurrency: int) -> list[str]:
    return [instrument_command(), "celery", "-A", "proj", "worker", "--pool", "prefork",
            "-c", str(concurrency), "--loglevel", "INFO", "--without-gossip",
            "--without-mingle", "--without-heartbeat"]


@pytest.fixture(scope="module")
def worker(receiver: Any, redis_url: str, database: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    proc = Process(
        "worker",
        _worker_argv(2), PROJECT, _env(receiver, "orders-worker", redis_url, database),
        tmp_path_factory.mktemp("worker-log"))
    try:
        proc.wait_log(" ready.", 60)
        yield proc
    finally:
        proc.stop()


WEB_SERVERS = {
    # What the guide recommends: one process. The autoreloader would run the project
    # twice, a file watcher and the server it restarts on every change.
    "runserver": lambda port: [sys.executable, "manage.py", "runserver", "--noreload",
                               f"127.0.0.1:{port}"],
    # ... which still traces: the server child inherits opentelemetry-instrument's
    # environment and is instrumented too.
    "runserver-autoreload": lambda port: [sys.executable, "manage.py", "runserver",
                                          f"127.0.0.1:{port}"],
    # Two forked workers: the SDK's span processor restarts its thread in each.
    "gunicorn": lambda port: ["gunicorn", "proj.wsgi", "--bind", f"127.0.0.1:{port}",
                              "--workers", "2"],
    # The project imported (Django set up, the Celery app created) in the master
    # before the fork: nothing there has published yet, so no broker connection is
    # shared by the workers.
    "gunicorn-preload": lambda port: ["gunicorn", "proj.wsgi", "--bind", f"127.0.0.1:{port}",
                                      "--workers", "2", "--preload"],
}
# Spans each web server sends outside any request: runserver's check for unapplied
# migrations at startup, two SELECTs that are each a trace of their own.
STARTUP_SPANS = {"runserver": ["SELECT", "SELECT"], "runserver-autoreload": ["SELECT", "SELECT"],
                 "gunicorn": [], "gunicorn-preload": []}


@pytest.fixture(scope="module", params=sorted(WEB_SERVERS))
def web(request: pytest.FixtureRequest, receiver: Any, redis_url: str, database: Path,
        worker: Process, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """``(server, base url)`` of the web process; the receiver holds only its spans
    (and the worker's for its requests)."""
    receiver.wait_quiet(0.5, 15)
    receiver.clear()
    port = free_port()
    logs = tmp_path_factory.mktemp("web-log")
    # HOME: recent gunicorn opens a control socket under ~/.gunicorn; one per run.
    proc = Process(request.param, [instrument_command(), *WEB_SERVERS[request.param](port)],
                   PROJECT, _env(receiver, "orders-web", redis_url, database, HOME=str(logs)),
                   logs)
    try:
        wait_for_port(port, 60, proc.proc)
        yield request.param, f"http://127.0.0.1:{port}"
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


def test_worker_banner(worker: Process) -> None:
    """The settings reached the worker: its queue and both tasks (autodiscovered)."""
    banner = worker.log()
    assert ".> orders " in banner
    assert f". {NOTIFY}\n" in banner and f". {PROCESS}\n" in banner


def test_one_trace_per_request(web: tuple[str, str], receiver: Any, database: Path) -> None:
    server_kind, url = web
    placed = []
    for n in range(REQUESTS):
        trace_id, caller, header = traceparent()
        status, body = post_json(f"{url}/orders/", {"item": f"teapot {n}", "quantity": n + 1},
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

    # Nothing else: no task span outside a request's trace, no stray trace but the
    # startup queries of runserver.
    traces = {trace_id for trace_id, _, _ in placed}
    expected = STARTUP_SPANS[server_kind]
    receiver.wait_for(lambda spans: len([s for s in spans if s["trace_id"] not in traces])
                      >= len(expected), 15)
    strays = [s for s in receiver.spans() if s["trace_id"] not in traces]
    assert sorted(s["name"] for s in strays) == STARTUP_SPANS[server_kind], strays
    assert all(s["parent_span_id"] is None and s["service.name"] == "orders-web" for s in strays)

    # And the tasks did their work: every order went placed -> processed -> notified.
    with sqlite3.connect(database) as db:
        ids = [body["id"] for _, _, body in placed]
        rows = db.execute(f"SELECT status FROM orders_order WHERE id IN ({','.join('?' * len(ids))})",
                          ids).fetchall()
    assert [status for (status,) in rows] == ["notified"] * REQUESTS


# -- the pitfall: DJANGO_SETTINGS_MODULE not exported ----------------------------------
# manage.py, proj/celery.py and proj/wsgi.py set it with os.environ.setdefault, as
# Django's templates do. Under opentelemetry-instrument that is too late: the Django
# instrumentation reads the settings at startup, before the project's code runs, and
# when DJANGO_SETTINGS_MODULE is unset it configures Django's empty defaults
# (settings.configure()); the project's settings are then never read.


def test_worker_without_settings_module_has_no_tasks(
        receiver: Any, redis_url: str, database: Path, tmp_path: Path) -> None:
    """The worker starts and reports ready, with no error, no task and the default
    queue: the orders queue is never consumed."""
    proc = Process("worker-no-settings", _worker_argv(1), PROJECT,
                   _env(receiver, "orders-worker", redis_url, database, settings_module=False),
                   tmp_path)
    try:
        output = proc.wait_log(" ready.", 60)
    finally:
        proc.stop()
    registered = output.split("[tasks]", 1)[1].split("\n[20", 1)[0]  # up to the first log line
    assert registered.strip() == "", registered
    assert ".> celery " in output and ".> orders " not in output
    # Connected all the same: Celery reads CELERY_BROKER_URL from the environment.
    port = redis_url.rsplit(":", 1)[1]
    assert [line for line in output.splitlines()
            if ".> transport:" in line and f"127.0.0.1:{port}/" in line], output
    assert "ERROR" not in output and "Traceback" not in output


def test_runserver_without_settings_module_fails_on_allowed_hosts(
        receiver: Any, redis_url: str, database: Path, tmp_path: Path) -> None:
    """runserver exits at once with an error about ALLOWED_HOSTS, which settings.py
    does set."""
    proc = Process("runserver-no-settings",
                   [instrument_command(), *WEB_SERVERS["runserver"](free_port())], PROJECT,
                   _env(receiver, "orders-web", redis_url, database, settings_module=False),
                   tmp_path)
    try:
        assert proc.wait_exit(60) == 1
    finally:
        proc.stop()
    assert "CommandError: You must set settings.ALLOWED_HOSTS if DEBUG is False." in proc.log()


def test_gunicorn_without_settings_module_fails_every_request(
        receiver: Any, redis_url: str, database: Path, tmp_path: Path) -> None:
    """gunicorn starts, and every request fails with 500: Django's defaults have no
    ROOT_URLCONF."""
    port = free_port()
    proc = Process("gunicorn-no-settings",
                   [instrument_command(), *WEB_SERVERS["gunicorn"](port)], PROJECT,
                   _env(receiver, "orders-web", redis_url, database, settings_module=False,
                        HOME=str(tmp_path)),
                   tmp_path)
    try:
        wait_for_port(port, 60, proc.proc)
        with pytest.raises(urllib.error.HTTPError) as failed:
            post_json(f"http://127.0.0.1:{port}/orders/", {"item": "teapot"}, {})
        assert failed.value.code == 500
        proc.wait_log("has no attribute 'ROOT_URLCONF'", 15)
    finally:
        proc.stop()


# -- without auto-instrumentation -------------------------------------------------------


def test_instrument_in_celery_py_without_auto_instrumentation(
        database: Path, tmp_path: Path) -> None:
    """The project with examples/without_auto_instrumentation.py (the SDK and ``instrument()``)
    at the end of proj/celery.py, as the guide says, run with plain
    ``celery`` and ``runserver`` (no opentelemetry-instrument, so no Django span and
    no DJANGO_SETTINGS_MODULE exported: manage.py's default works again): each request's
    publish starts a trace that holds both tasks, exactly four spans."""
    project = tmp_path / "project"
    shutil.copytree(PROJECT, project, ignore=shutil.ignore_patterns("__pycache__", "*.sqlite3"))
    with open(project / "proj" / "celery.py", "a") as celery_py:
        celery_py.write("\n" + (EXAMPLES / "without_auto_instrumentation.py").read_text())

    # A Redis of its own: the module's worker consumes the same queue name.
    with redis_server() as (redis_url, _redis), _receiver.OTLPReceiver() as receiver:
        env = {"CELERY_BROKER_URL": redis_url, "DJANGO_DB_PATH": str(database)}
        worker = Process("manual-worker", _worker_argv(2)[1:], project,
                         otel_env(receiver.http_endpoint, "orders-worker", **env), tmp_path)
        port = free_port()
        web = Process("manual-web", WEB_SERVERS["runserver"](port), project,
                      otel_env(receiver.http_endpoint, "orders-web", **env), tmp_path)
        try:
            worker.wait_log(" ready.", 60)
            wait_for_port(port, 60, web.proc)
            for n in range(2):
                status, _ = post_json(f"http://127.0.0.1:{port}/orders/", {"item": f"cup {n}"}, {})
                assert status == 202

            def two_done(spans: list[Span]) -> bool:
                return len(find(spans, name=f"process {NOTIFY}")) >= 2

            receiver.wait_for(two_done, 30)
            receiver.wait_quiet(1.0, 15)
        finally:
            web.stop()
            worker.stop()
        traces = receiver.traces()

    assert len(traces) == 2, {t: [s["name"] for s in spans] for t, spans in traces.items()}
    for spans in traces.values():
        assert sorted(s["name"] for s in spans) == sorted(
            [f"send {PROCESS}", f"process {PROCESS}", f"send {NOTIFY}", f"process {NOTIFY}"])
        send = find_one(spans, name=f"send {PROCESS}", kind="PRODUCER")
        assert send["service.name"] == "orders-web" and send["parent_span_id"] is None
        process = find_one(spans, name=f"process {PROCESS}", kind="CONSUMER")
        assert process["service.name"] == "orders-worker"
        assert process["parent_span_id"] == send["span_id"]
        follow_up = find_one(spans, name=f"send {NOTIFY}", kind="PRODUCER")
        assert follow_up["parent_span_id"] == process["span_id"]
        notify = find_one(spans, name=f"process {NOTIFY}", kind="CONSUMER")
        assert notify["parent_span_id"] == follow_up["span_id"]
