"""examples/flask_celery end to end, run as its README says: a Flask app factory with
Flask's Celery pattern (celery_init_app), the web process and a prefork worker each
under ``opentelemetry-instrument`` (the Flask and our instrumentations, no tracing
code in the app), a real Redis, spans over OTLP/HTTP to a receiver this test runs.

Each request is its own trace of exactly three spans: Flask's SERVER span, the
publish of ``send_receipt`` under it and the task's CONSUMER span under that.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.example import load
from tests.support.servers import free_port, redis_server, wait_for_port
from tests.support.web_example import (
    EXAMPLES,
    Process,
    instrument_command,
    otel_env,
    post_json,
    traceparent,
)

_receiver = load("otlp_receiver")
find, find_one = _receiver.find, _receiver.find_one

PROJECT = EXAMPLES / "flask_celery"
REQUESTS = 3
TASK = "shop.tasks.send_receipt"
SHAPE = {
    ("POST /receipts", "SERVER"): 1,
    (f"send {TASK}", "PRODUCER"): 1,
    (f"process {TASK}", "CONSUMER"): 1,
}


@pytest.fixture(scope="module")
def receiver() -> Iterator[Any]:
    with _receiver.OTLPReceiver() as running:
        yield running


def _env(receiver: Any, service: str, redis_url: str, **extra: str) -> dict[str, str]:
    return otel_env(receiver.http_endpoint, service, CELERY_BROKER_URL=redis_url,
                    RECEIPT_SENDER="billing@shop.test", **extra)


WORKER_ARGV = ["celery", "-A", "make_celery", "worker", "--pool", "prefork", "-c", "2",
               "--loglevel", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat"]


@pytest.fixture(scope="module")
def worker(receiver: Any, redis_url: str,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    proc = Process("worker", [instrument_command(), *WORKER_ARGV], PROJECT,
                   _env(receiver, "shop-worker", redis_url), tmp_path_factory.mktemp("worker-log"))
    try:
        banner = proc.wait_log(" ready.", 60)
        assert ".> receipts " in banner and f". {TASK}\n" in banner, banner
        yield proc
    finally:
        proc.stop()


WEB_SERVERS = {
    # Flask's development server: no reloader unless --debug (or --reload) is given.
    "flask-run": lambda port: ["flask", "--app", "shop", "run", "--host", "127.0.0.1",
                               "--port", str(port)],
    "gunicorn": lambda port: ["gunicorn", "shop:create_app()", "--bind", f"127.0.0.1:{port}",
                              "--workers", "2"],
}


@pytest.fixture(scope="module", params=sorted(WEB_SERVERS))
def web(request: pytest.FixtureRequest, receiver: Any, redis_url: str, worker: Process,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    receiver.wait_quiet(0.5, 15)
    receiver.clear()
    port = free_port()
    logs = tmp_path_factory.mktemp("web-log")
    # HOME: recent gunicorn opens a control socket under ~/.gunicorn; one per run.
    proc = Process(request.param, [instrument_command(), *WEB_SERVERS[request.param](port)],
                   PROJECT, _env(receiver, "shop-web", redis_url, HOME=str(logs)), logs)
    try:
        wait_for_port(port, 60, proc.proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


def _complete(spans: list[dict[str, Any]]) -> bool:
    return all(len(find(spans, name=name, kind=kind)) >= count
               for (name, kind), count in SHAPE.items())


def test_one_trace_per_request(web: str, receiver: Any, worker: Process) -> None:
    placed = []
    for n in range(REQUESTS):
        trace_id, caller, header = traceparent()
        status, body = post_json(f"{web}/receipts", {"email": f"c{n}@example.com", "total": n + 0.5},
                                 {"traceparent": header})
        assert status == 202, body
        placed.append((trace_id, caller, n))

    for trace_id, _, _ in placed:
        receiver.wait_for_trace(trace_id, _complete, 30)
    receiver.wait_quiet(1.0, 15)  # anything extra would have arrived by now

    for trace_id, caller, n in placed:
        spans = receiver.spans(trace_id)
        counts = {key: len(find(spans, name=key[0], kind=key[1])) for key in SHAPE}
        assert counts == SHAPE and len(spans) == 3, sorted(s["name"] for s in spans)

        server = find_one(spans, kind="SERVER")
        assert server["service.name"] == "shop-web"
        assert server["parent_span_id"] == caller
        assert server["attributes"]["http.route"] == "/receipts"

        send = find_one(spans, kind="PRODUCER")
        assert send["service.name"] == "shop-web"
        assert send["parent_span_id"] == server["span_id"]
        assert send["attributes"]["messaging.destination.name"] == "receipts"

        process = find_one(spans, kind="CONSUMER")
        assert process["service.name"] == "shop-worker"
        assert process["parent_span_id"] == send["span_id"]
        assert process["attributes"]["celery.task.state"] == "SUCCESS"
        assert process["attributes"]["messaging.message.id"] == \
            send["attributes"]["messaging.message.id"]

    # No span outside the requests' traces.
    traces = {trace_id for trace_id, _, _ in placed}
    assert [s["name"] for s in receiver.spans() if s["trace_id"] not in traces] == []
    # The task ran in the Flask app context (celery_init_app): it read the app's config.
    for n in range(REQUESTS):
        worker.wait_log(f"receipt for {n + 0.5:.2f} from billing@shop.test to c{n}@example.com", 10)


def test_instrument_in_app_package_without_auto_instrumentation(tmp_path: Path) -> None:
    """The app with examples/without_auto_instrumentation.py (the SDK and
    ``instrument()``) at the end of shop/__init__.py, as the guide says, run with plain
    ``celery`` and ``flask run``: each request's publish starts a trace of two spans,
    the publish and the task."""
    project = tmp_path / "project"
    shutil.copytree(PROJECT, project, ignore=shutil.ignore_patterns("__pycache__"))
    with open(project / "shop" / "__init__.py", "a") as package:
        package.write("\n" + (EXAMPLES / "without_auto_instrumentation.py").read_text())

    # A Redis of its own: the module's worker consumes the same queue name.
    with redis_server() as (redis_url, _redis), _receiver.OTLPReceiver() as receiver:
        worker = Process("manual-worker", WORKER_ARGV, project,
                         _env(receiver, "shop-worker", redis_url), tmp_path)
        port = free_port()
        web = Process("manual-web", WEB_SERVERS["flask-run"](port), project,
                      _env(receiver, "shop-web", redis_url), tmp_path)
        try:
            worker.wait_log(" ready.", 60)
            wait_for_port(port, 60, web.proc)
            for n in range(2):
                status, _ = post_json(f"http://127.0.0.1:{port}/receipts",
                                      {"email": f"m{n}@example.com", "total": 1}, {})
                assert status == 202
            receiver.wait_for(lambda spans: len(find(spans, name=f"process {TASK}")) >= 2, 30)
            receiver.wait_quiet(1.0, 15)
        finally:
            web.stop()
            worker.stop()
        traces = receiver.traces()

    assert len(traces) == 2, {t: [s["name"] for s in spans] for t, spans in traces.items()}
    for spans in traces.values():
        assert len(spans) == 2, [s["name"] for s in spans]
        send = find_one(spans, name=f"send {TASK}", kind="PRODUCER")
        assert send["service.name"] == "shop-web" and send["parent_span_id"] is None
        process = find_one(spans, name=f"process {TASK}", kind="CONSUMER")
        assert process["service.name"] == "shop-worker"
        assert process["parent_span_id"] == send["span_id"]
        assert process["attributes"]["celery.task.state"] == "SUCCESS"
