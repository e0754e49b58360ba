"""What tests/test_coexist_sentry.py and test_coexist_ddtrace.py share: a loopback HTTP
endpoint standing in for Sentry's ingestion or Datadog's agent, and one run of the
coexistence producer (tests/support/coexist_producer.py) against a worker subprocess."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.support.file_exporter import read_spans
from tests.support.jsonlines import read_json_lines
from tests.support.prefork import ROOT, prefork_worker

# What each run publishes (coexist_producer.run): its task, and how many messages (a
# retry is a second message with the task's id, published from the worker).
TASKS = {"delay": ("c.report", 1), "chain": ("c.report", 2), "group": ("c.report", 3),
         "retry": ("c.retry_report", 2)}


class Sink:
    """Every request body POSTed to it, decompressed, in arrival order."""

    def __init__(self) -> None:
        self.bodies: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                encoding = self.headers.get("Content-Encoding", "")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "br":
                    import brotli  # only if the SDK found it installed

                    body = brotli.decompress(body)
                with sink._lock:
                    sink.bodies.append((self.path, body))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            do_POST = do_PUT = _answer

            def do_GET(self) -> None:  # ddtrace asks the agent's /info: "no such agent"
                self.send_response(404)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def received(self) -> list[tuple[str, bytes]]:
        with self._lock:
            return list(self.bodies)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@contextmanager
def sink() -> Iterator[Sink]:
    server = Sink()
    try:
        yield server
    finally:
        server.close()


def envelopes(server: Sink) -> list[tuple[dict[str, Any], list[tuple[dict[str, Any], Any]]]]:
    """Sentry envelopes received: (envelope header, [(item header, payload)])."""
    found = []
    for path, body in server.received():
        if not path.endswith("/envelope/"):
            continue
        header_line, _, rest = body.partition(b"\n")
        items = []
        while rest.strip():
            item_line, _, rest = rest.partition(b"\n")
            item = json.loads(item_line)
            if "length" in item:
                payload, rest = rest[: item["length"]], rest[item["length"] + 1:]
            else:
                payload, _, rest = rest.partition(b"\n")
            items.append((item, json.loads(payload) if item.get("type") == "transaction" else payload))
        found.append((json.loads(header_line), items))
    return found


def transactions(server: Sink) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(envelope header, transaction event) of every Sentry transaction received."""
    return [(header, payload) for header, items in envelopes(server)
            for item, payload in items if item.get("type") == "transaction"]


def published(path: Path, stage: str) -> dict[str, dict[str, Any]]:
    """Message id -> headers recorded at ``stage`` ("built" or "sent") by coexist_app."""
    records = read_json_lines(path)
    return {r["id"]: r for r in records if r["stage"] == stage}


def run_producer(broker_url: str, tmp_path: Path, vendor: str, order: str,
                 env: dict[str, str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], Path]:
    """A worker subprocess and the producer subprocess, both with ``vendor`` initialised in
    ``order``: (the producer's runs, every span of both processes, the published-headers file)."""
    published_file = tmp_path / f"published-{vendor}-{order}.jsonl"
    common = {"VENDOR": vendor, "ORDER": order, "PUBLISHED_FILE": str(published_file), **env}
    with prefork_worker(broker_url, tmp_path, concurrency=1, pool="solo",
                        app_module="tests.support.coexist_app",
                        env={**common, "SERVICE": "worker"}) as worker:
        out = tmp_path / f"runs-{vendor}-{order}.json"
        producer_spans = tmp_path / f"producer-spans-{vendor}-{order}.jsonl"
        proc = subprocess.run(
            [sys.executable, "-m", "tests.support.coexist_producer", str(out)], cwd=ROOT,
            env=dict(os.environ, BROKER_URL=broker_url, QUEUE=worker.queue, SPAN_FILE=str(producer_spans),
                     SERVICE="producer", PYTHONPATH=str(ROOT), **common),
            capture_output=True, text=True, timeout=180,
        )
        assert proc.returncode == 0, f"producer failed:\n{proc.stderr[-4000:]}\nworker log:\n{worker.log()[-3000:]}"
        runs = json.loads(out.read_text())
        seen = {report["span_id"] for run in runs for report in run["reports"]}
        consumed = worker.wait_spans(
            lambda spans: spans if seen <= {s["span_id"] for s in spans if s["kind"] == "CONSUMER"} else None)
        assert "Traceback" not in worker.log() and "otel-celery-headers" not in worker.log(), worker.log()[-3000:]
    return runs, read_spans(producer_spans) + consumed, published_file


def shape(spans: list[dict[str, Any]], trace_id: str) -> Counter[tuple[str, str]]:
    """(kind, name) -> how many spans of trace ``trace_id``."""
    return Counter((s["kind"], s["name"]) for s in spans if s["trace_id"] == trace_id)


def expected_shape(run: dict[str, Any]) -> Counter[tuple[str, str]]:
    """A run's trace without any other vendor: the web request, a publish and a process per message."""
    task, n = TASKS[run["shape"]]
    return Counter({("INTERNAL", run["root"]): 1, ("PRODUCER", f"send {task}"): n,
                    ("CONSUMER", f"process {task}"): n})


def assert_our_trace(run: dict[str, Any], spans: list[dict[str, Any]]) -> None:
    """Our trace of one run, as without another vendor: its exact shape, the task body
    inside its process span with the caller's baggage exactly, that span the child of
    its message's publish span; a retry's publish the child of the attempt that retried."""
    assert shape(spans, run["trace_id"]) == expected_shape(run), run["root"]
    ours = {s["span_id"]: s for s in spans if s["trace_id"] == run["trace_id"]}
    for report in run["reports"]:
        assert report["trace_id"] == run["trace_id"]
        process = ours[report["span_id"]]
        send = ours[process["parent_id"]]
        assert (process["kind"], send["kind"]) == ("CONSUMER", "PRODUCER")
        ids = {s["attributes"].get("messaging.message.id") for s in (process, send)}
        assert ids == {report["id"]}
        if run["shape"] == "retry":
            retried = ours[send["parent_id"]]
            assert (retried["kind"], retried["attributes"]["messaging.message.id"]) == ("CONSUMER", report["id"])
        assert report["baggage"] == ({"tenant": "acme"} if run["baggage"] else {})
    # The first publishes of each run are children of the web request's span.
    roots = {s["span_id"] for s in ours.values() if s["name"] == run["root"]}
    assert len([s for s in ours.values() if s["kind"] == "PRODUCER" and s["parent_id"] in roots]) == (
        3 if run["shape"] == "group" else 1)


def assert_every_run(runs: list[dict[str, Any]], spans: list[dict[str, Any]]) -> None:
    """The producer's runs (each shape, with and without caller baggage), each as
    ``assert_our_trace`` says."""
    assert [(run["shape"], run["baggage"]) for run in runs] == [
        (shape, with_baggage) for shape in TASKS for with_baggage in (False, True)]
    for run in runs:
        assert_our_trace(run, spans)
