"""A small OTLP trace receiver for demos and tests: collect spans, print waterfalls.

Not a collector: it keeps every span in memory, has no auth and listens on loopback.
It accepts OTLP/HTTP protobuf (``POST /v1/traces``, optionally gzip) and, when
``grpcio`` is installed and asked for, OTLP/gRPC. Metrics go to ``on_metrics`` (each
``ExportMetricsServiceRequest`` as it arrives; see ``metrics_summary.py``) or are
dropped, as logs are, so a process exporting all three signals gets no errors.

In code::

    from otlp_receiver import OTLPReceiver, find, find_one, is_descendant

    with OTLPReceiver(grpc=True, print_traces=True) as receiver:
        # point processes at receiver.http_endpoint (OTEL_EXPORTER_OTLP_ENDPOINT,
        # OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf) or receiver.grpc_endpoint (grpc)
        ...
        spans = receiver.wait_for_trace(trace_id, lambda t: find(t, kind="CONSUMER"))

From a shell (runs until Ctrl-C, prints each trace once it is finished, and the
metrics summary of ``metrics_summary.py`` at the end)::

    python otlp_receiver.py --http-port 4318 --grpc-port 4317 [--dump spans.json]

Each span is a plain dict (JSON-serialisable)::

    {"trace_id": "4bf9...36" (32 hex), "span_id": "00f0...b7" (16 hex),
     "parent_span_id": "..." or None, "name": "process process_order",
     "kind": "INTERNAL" | "SERVER" | "CLIENT" | "PRODUCER" | "CONSUMER",
     "service.name": "orders-worker", "scope": "otel_celery_headers",
     "start_ns": int, "end_ns": int, "duration_ns": int,
     "status": {"code": "UNSET" | "OK" | "ERROR", "message": str},
     "attributes": {...}, "events": [{"name", "time_ns", "attributes"}],
     "links": [{"trace_id", "span_id", "attributes"}], "resource": {...}}

A trace is *finished* when no span of it arrived for ``settle`` seconds; with
``print_traces=True`` it is then printed as a waterfall (again, marked "updated", if
late spans come in after that).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import IO, Any, TypeVar

from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

__all__ = [
    "OTLPReceiver",
    "find",
    "find_one",
    "is_descendant",
    "matches",
    "render_waterfall",
    "spans_from_request",
    "group_by_trace",
    "QUEUE_TIME_ATTRIBUTE",
]

Span = dict[str, Any]
MetricsRequest = metrics_service_pb2.ExportMetricsServiceRequest
T = TypeVar("T")

#: Set by otel-celery-headers on CONSUMER spans: seconds the message waited.
QUEUE_TIME_ATTRIBUTE = "celery.message.queue_time"

_KINDS = {0: "INTERNAL", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}
_STATUS = {0: "UNSET", 1: "OK", 2: "ERROR"}


# -- decoding -------------------------------------------------------------------------


def _any_value(value: AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_any_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _any_value(kv.value) for kv in value.kvlist_value.values}
    if which == "bytes_value":
        return value.bytes_value.hex()
    return getattr(value, which)


def _attributes(key_values: Iterable[Any]) -> dict[str, Any]:
    return {kv.key: _any_value(kv.value) for kv in key_values}


def spans_from_request(request: trace_service_pb2.ExportTraceServiceRequest) -> list[Span]:
    """Flatten an ``ExportTraceServiceRequest`` into span dicts (see the module doc)."""
    spans: list[Span] = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        service = str(resource.get("service.name", "unknown_service"))
        for scope_spans in resource_spans.scope_spans:
            scope = scope_spans.scope.name
            for span in scope_spans.spans:
                spans.append(
                    {
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex() or None,
                        "name": span.name,
                        "kind": _KINDS.get(span.kind, "INTERNAL"),
                        "service.name": service,
                        "scope": scope,
                        "start_ns": span.start_time_unix_nano,
                        "end_ns": span.end_time_unix_nano,
                        "duration_ns": span.end_time_unix_nano - span.start_time_unix_nano,
                        "status": {
                            "code": _STATUS.get(span.status.code, "UNSET"),
                            "message": span.status.message,
                        },
                        "attributes": _attributes(span.attributes),
                        "events": [
                            {
                                "name": event.name,
                                "time_ns": event.time_unix_nano,
                                "attributes": _attributes(event.attributes),
                            }
                            for event in span.events
                        ],
                        "links": [
                            {
                                "trace_id": link.trace_id.hex(),
                                "span_id": link.span_id.hex(),
                                "attributes": _attributes(link.attributes),
                            }
                            for link in span.links
                        ],
                        "resource": resource,
                    }
                )
    return spans


# -- queries --------------------------------------------------------------------------


def matches(
    span: Span,
    *,
    name: str | None = None,
    kind: str | None = None,
    service: str | None = None,
    status: str | None = None,
    trace_id: str | None = None,
    attributes: Mapping[str, Any] | None = None,
) -> bool:
    """True if ``span`` has every property given (attributes: each key equal)."""
    if name is not None and span["name"] != name:
        return False
    if kind is not None and span["kind"] != kind.upper():
        return False
    if service is not None and span["service.name"] != service:
        return False
    if status is not None and span["status"]["code"] != status.upper():
        return False
    if trace_id is not None and span["trace_id"] != trace_id:
        return False
    if attributes:
        for key, value in attributes.items():
            if span["attributes"].get(key, _MISSING) != value:
                return False
    return True


_MISSING = object()


def find(spans: Iterable[Span], **criteria: Any) -> list[Span]:
    """The spans matching ``criteria`` (keywords of :func:`matches`), by start time."""
    return sorted((s for s in spans if matches(s, **criteria)), key=lambda s: s["start_ns"])


def find_one(spans: Iterable[Span], **criteria: Any) -> Span:
    """The one span matching ``criteria``; AssertionError naming what was there if not."""
    spans = list(spans)
    found = find(spans, **criteria)
    if len(found) != 1:
        names = sorted(f"{s['kind']} {s['name']!r} ({s['service.name']})" for s in spans)
        raise AssertionError(
            f"expected exactly one span matching {criteria}, found {len(found)} among: "
            + ", ".join(names)
        )
    return found[0]


def is_descendant(spans: Iterable[Span], span: Span, ancestor: Span) -> bool:
    """True if ``ancestor`` is reached from ``span`` by following parent ids."""
    by_id = {s["span_id"]: s for s in spans if s["trace_id"] == span["trace_id"]}
    seen: set[str] = set()
    parent_id = span["parent_span_id"]
    while parent_id and parent_id not in seen:
        if parent_id == ancestor["span_id"] and span["trace_id"] == ancestor["trace_id"]:
            return True
        seen.add(parent_id)
        parent = by_id.get(parent_id)
        if parent is None:
            return False
        parent_id = parent["parent_span_id"]
    return False


def group_by_trace(spans: Iterable[Span]) -> dict[str, list[Span]]:
    traces: dict[str, list[Span]] = {}
    for span in spans:
        traces.setdefault(span["trace_id"], []).append(span)
    return traces


# -- waterfall ------------------------------------------------------------------------

_RESET = "\033[0m"
_BOLD = "\033[1m"
_DIM = "\033[2m"
_RED = "\033[31m"
_PALETTE = ["\033[36m", "\033[35m", "\033[33m", "\033[32m", "\033[34m", "\033[96m"]


def _fmt_duration(ns: float) -> str:
    ms = ns / 1e6
    if ms < 1:
        return f"{ms:.2f} ms"
    if ms < 1000:
        return f"{ms:.1f} ms"
    return f"{ms / 1000:.2f} s"


def _tree(spans: list[Span]) -> list[tuple[Span, str]]:
    """Depth-first order with tree prefixes; spans whose parent is absent are roots."""
    ids = {s["span_id"] for s in spans}
    children: dict[str | None, list[Span]] = {}
    for span in spans:
        parent = span["parent_span_id"] if span["parent_span_id"] in ids else None
        children.setdefault(parent, []).append(span)
    for group in children.values():
        group.sort(key=lambda s: (s["start_ns"], s["end_ns"]))
    rows: list[tuple[Span, str]] = []

    def walk(span: Span, prefix: str, last: bool, depth: int) -> None:
        branch = "" if depth == 0 else ("└ " if last else "├ ")
        rows.append((span, prefix + branch))
        kids = children.get(span["span_id"], [])
        extension = "" if depth == 0 else ("  " if last else "│ ")
        for i, kid in enumerate(kids):
            walk(kid, prefix + extension, i == len(kids) - 1, depth + 1)

    for root in children.get(None, []):
        walk(root, "", True, 0)
    # Parent ids that form a cycle leave spans unreachable from any root: show them too.
    shown = {id(span) for span, _ in rows}
    for span in sorted(spans, key=lambda s: s["start_ns"]):
        if id(span) not in shown:
            rows.append((span, "? "))
    return rows


def render_waterfall(
    spans: list[Span],
    *,
    color: bool = False,
    width: int = 40,
    ascii_only: bool = False,
    title: str | None = None,
) -> str:
    """One trace as text: a span per line, indented under its parent, with the
    service, the kind, a bar on the trace's time axis, the duration, the time in
    queue of CONSUMER spans (drawn as a light bar before the span) and errors."""
    if not spans:
        return "(no spans)"
    full, light, tick = ("#", ".", "|") if ascii_only else ("█", "░", "▏")

    def paint(text: str, *codes: str) -> str:
        return "".join(codes) + text + _RESET if color and codes else text

    def queue_ns(span: Span) -> float:
        value = span["attributes"].get(QUEUE_TIME_ATTRIBUTE)
        return float(value) * 1e9 if isinstance(value, (int, float)) else 0.0

    rows = _tree(spans)
    t0 = min(s["start_ns"] - queue_ns(s) for s in spans)
    t1 = max(s["end_ns"] for s in spans)
    total = max(t1 - t0, 1)
    scale = width / total

    services = sorted({s["service.name"] for s in spans}, key=lambda n: min(
        x["start_ns"] for x in spans if x["service.name"] == n))
    service_colour = {name: _PALETTE[i % len(_PALETTE)] for i, name in enumerate(services)}
    service_w = max(len(n) for n in services)
    label_w = min(max(len(prefix) + len(s["name"]) for s, prefix in rows), 48)
    errors = [s for s in spans if s["status"]["code"] == "ERROR"]

    root = rows[0][0]
    header = title or root["name"]
    summary = (
        f"trace {root['trace_id']}  {header}  {_fmt_duration(total)}  "
        f"{len(spans)} span{'s' if len(spans) != 1 else ''}, "
        f"{len(services)} service{'s' if len(services) != 1 else ''}"
    )
    if errors:
        summary += f"  {len(errors)} error" + ("s" if len(errors) > 1 else "")
    lines = [paint(summary, _BOLD, _RED) if errors and color else paint(summary, _BOLD)]
    axis_left = "0"
    axis_right = _fmt_duration(total)
    pad = " " * (service_w + 2 + label_w + 2 + 9)
    lines.append(paint(pad + axis_left.ljust(width - len(axis_right)) + axis_right, _DIM))

    for span, prefix in rows:
        start = (span["start_ns"] - t0) * scale
        end = (span["end_ns"] - t0) * scale
        first = min(int(start), width - 1)
        last = max(first + 1, min(int(end + 0.999), width))
        q = queue_ns(span)
        q_first = min(int((span["start_ns"] - q - t0) * scale), first) if q else first
        bar_chars = [" "] * width
        for i in range(q_first, first):
            bar_chars[i] = light
        for i in range(first, last):
            bar_chars[i] = full
        if last - first == 1 and (end - start) < 0.5:
            bar_chars[first] = tick
        queue_part = "".join(bar_chars[:first])
        span_part = "".join(bar_chars[first:last])
        tail = "".join(bar_chars[last:])
        failed = span["status"]["code"] == "ERROR"
        bar = (
            paint(queue_part, _DIM)
            + paint(span_part, _RED if failed else service_colour[span["service.name"]])
            + tail
        )
        label = prefix + span["name"]
        if len(label) > label_w:
            label = label[: label_w - 1] + "…"
        notes = []
        if q:
            notes.append(f"queued {_fmt_duration(q)}")
        links = span.get("links") or []
        if links:
            kinds = sorted({str((link.get("attributes") or {}).get("celery.link", "link")) for link in links})
            notes.append(f"{len(links)} link{'s' if len(links) > 1 else ''} ({', '.join(kinds)})")
        reason = span["attributes"].get("celery.task.revoked.reason")
        if reason:
            notes.append("REVOKED" if reason == "revoked" else f"REVOKED ({reason})")
        if failed:
            message = span["status"]["message"] or span["attributes"].get("error.type", "")
            notes.append(paint(f"ERROR {message}".rstrip(), _BOLD, _RED))
        service = paint(span["service.name"].ljust(service_w), service_colour[span["service.name"]])
        kind = span["kind"].lower().ljust(8)
        line = (
            f"{service}  {paint(label.ljust(label_w), _RED) if failed else label.ljust(label_w)}"
            f"  {paint(kind, _DIM)} {bar} {_fmt_duration(span['duration_ns']).rjust(9)}"
        )
        if notes:
            line += "  " + "  ".join(notes)
        lines.append(line.rstrip())
    return "\n".join(lines)


# -- the receiver ---------------------------------------------------------------------


class _TraceState:
    __slots__ = ("spans", "last_arrival", "printed")

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.last_arrival = 0.0
        self.printed = 0  # how many spans the last printed version had


class OTLPReceiver:
    """Collects spans sent over OTLP; ``start()`` binds free loopback ports.

    ``http``/``grpc`` choose the transports (gRPC needs ``grpcio``); ports 0 mean
    "any free port". With ``print_traces`` each finished trace (no new span for
    ``settle`` seconds) is written to ``out`` as a waterfall; ``color=None`` means
    colour only if ``out`` is a terminal. ``on_metrics`` is called, on a receiver
    thread, with each ``ExportMetricsServiceRequest`` before the exporter gets its
    reply (so once an exporting process has exited, its last metrics are in).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        http: bool = True,
        http_port: int = 0,
        grpc: bool = False,
        grpc_port: int = 0,
        print_traces: bool = False,
        settle: float = 1.5,
        out: IO[str] | None = None,
        color: bool | None = None,
        width: int = 40,
        on_metrics: Callable[[MetricsRequest], None] | None = None,
    ) -> None:
        self.host = host
        self.on_metrics = on_metrics
        self._want_http, self._http_port = http, http_port
        self._want_grpc, self._grpc_port = grpc, grpc_port
        self.print_traces = print_traces
        self.settle = settle
        self._out = out or sys.stdout
        self.color = color if color is not None else _isatty(self._out)
        encoding = (getattr(self._out, "encoding", None) or "").lower()
        self.ascii_only = "utf" not in encoding
        self.width = width
        self._lock = threading.Condition()
        self._spans: list[Span] = []
        self._traces: dict[str, _TraceState] = {}
        self._last_arrival = time.monotonic()
        self._requests = 0
        self._http_server: ThreadingHTTPServer | None = None
        self._grpc_server: Any = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    # lifecycle

    def start(self) -> OTLPReceiver:
        if self._want_http:
            self._http_server = ThreadingHTTPServer((self.host, self._http_port), _handler(self))
            self._http_server.daemon_threads = True
            self._http_port = self._http_server.server_address[1]
            self._spawn(self._http_server.serve_forever, "otlp-http")
        if self._want_grpc:
            self._grpc_server, self._grpc_port = _start_grpc(self, self.host, self._grpc_port)
        if self.print_traces:
            self._spawn(self._print_loop, "otlp-printer")
        return self

    def stop(self, print_pending: bool = True) -> None:
        """Stop listening; with ``print_traces``, print what was not printed yet."""
        self._stopping.set()
        if self._http_server is not None:
            self._http_server.shutdown()
            self._http_server.server_close()
            self._http_server = None
        if self._grpc_server is not None:
            self._grpc_server.stop(grace=1).wait(2)
            self._grpc_server = None
        for thread in self._threads:
            thread.join(5)
        self._threads.clear()
        if self.print_traces and print_pending:
            self._print_ready(force=True)

    def __enter__(self) -> OTLPReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    # endpoints

    @property
    def http_endpoint(self) -> str:
        """Base URL for ``OTEL_EXPORTER_OTLP_ENDPOINT`` (exporters add ``/v1/traces``)."""
        if self._http_server is None:
            raise RuntimeError("the HTTP receiver is not running")
        return f"http://{self.host}:{self._http_port}"

    @property
    def traces_url(self) -> str:
        """Full URL for ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``."""
        return self.http_endpoint + "/v1/traces"

    @property
    def grpc_endpoint(self) -> str:
        if self._grpc_server is None:
            raise RuntimeError("the gRPC receiver is not running")
        return f"http://{self.host}:{self._grpc_port}"

    # ingestion

    def add(self, spans: list[Span]) -> None:
        now = time.monotonic()
        with self._lock:
            self._requests += 1
            for span in spans:
                self._spans.append(span)
                state = self._traces.setdefault(span["trace_id"], _TraceState())
                state.spans.append(span)
                state.last_arrival = now
            if spans:
                self._last_arrival = now
            self._lock.notify_all()

    def clear(self) -> None:
        with self._lock:
            self._spans.clear()
            self._traces.clear()

    # reading

    def spans(self, trace_id: str | None = None) -> list[Span]:
        """A snapshot of the spans received (of one trace, if given), in arrival order."""
        with self._lock:
            if trace_id is None:
                return list(self._spans)
            state = self._traces.get(trace_id)
            return list(state.spans) if state else []

    def traces(self) -> dict[str, list[Span]]:
        with self._lock:
            return {tid: list(state.spans) for tid, state in self._traces.items()}

    def dump_json(self, path: str | os.PathLike[str]) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump({"spans": self.spans()}, fh, indent=1, sort_keys=True)

    # waiting

    def wait_for(
        self, predicate: Callable[[list[Span]], T], timeout: float = 10.0
    ) -> T:
        """Wait until ``predicate(all spans)`` is truthy and return its value."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                result = predicate(list(self._spans))
                if result:
                    return result
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"condition not met after {timeout}s; {len(self._spans)} spans "
                        "received: " + ", ".join(sorted({s["name"] for s in self._spans}))
                    )
                self._lock.wait(min(remaining, 0.5))

    def wait_for_trace(
        self, trace_id: str, predicate: Callable[[list[Span]], T], timeout: float = 10.0
    ) -> T:
        """Wait until ``predicate(spans of trace_id)`` is truthy and return its value."""
        return self.wait_for(
            lambda spans: predicate([s for s in spans if s["trace_id"] == trace_id]), timeout
        )

    def wait_for_span(self, timeout: float = 10.0, **criteria: Any) -> Span:
        """Wait for a span matching ``criteria`` (keywords of :func:`matches`)."""
        found = self.wait_for(lambda spans: find(spans, **criteria), timeout)
        return found[0]

    def wait_quiet(self, quiet: float = 1.0, timeout: float = 10.0) -> None:
        """Wait until no span arrived for ``quiet`` seconds."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                idle = time.monotonic() - self._last_arrival
                if idle >= quiet:
                    return
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"spans still arriving after {timeout}s")
                self._lock.wait(min(quiet - idle, deadline - time.monotonic()) + 0.01)

    def wait_trace_quiet(self, trace_id: str, quiet: float = 1.0, timeout: float = 10.0) -> None:
        """Wait until no span of ``trace_id`` arrived for ``quiet`` seconds."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                state = self._traces.get(trace_id)
                idle = time.monotonic() - state.last_arrival if state else 0.0
                if state is not None and idle >= quiet:
                    return
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"trace {trace_id} still changing after {timeout}s")
                self._lock.wait(max(0.01, min(quiet - idle, deadline - time.monotonic())))

    def wait_printed(self, timeout: float = 10.0) -> None:
        """With ``print_traces``: wait until every trace was printed in its latest state."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if all(st.printed == len(st.spans) for st in self._traces.values()):
                    return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"traces still unprinted after {timeout}s")
            time.sleep(0.05)

    # printing

    def render(self, trace_id: str, title: str | None = None) -> str:
        return render_waterfall(
            self.spans(trace_id), color=self.color, width=self.width,
            ascii_only=self.ascii_only, title=title,
        )

    def _print_loop(self) -> None:
        while not self._stopping.wait(0.1):
            self._print_ready(force=False)

    def _print_ready(self, force: bool) -> None:
        now = time.monotonic()
        ready: list[tuple[int, list[Span], bool]] = []
        with self._lock:
            for state in self._traces.values():
                fresh = len(state.spans) > state.printed
                if fresh and (force or now - state.last_arrival >= self.settle):
                    ready.append((min(s["start_ns"] for s in state.spans),
                                  list(state.spans), state.printed > 0))
                    state.printed = len(state.spans)
        for _, spans, updated in sorted(ready, key=lambda item: item[0]):
            text = render_waterfall(
                spans, color=self.color, width=self.width, ascii_only=self.ascii_only
            )
            if updated:
                text = "(updated: late spans arrived)\n" + text
            try:
                self._out.write(text + "\n\n")
                self._out.flush()
            except (OSError, ValueError):
                pass


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty() and os.environ.get("NO_COLOR") is None
    except (AttributeError, ValueError):
        return False


# -- OTLP/HTTP -------------------------------------------------------------------------


def _handler(receiver: OTLPReceiver) -> type[BaseHTTPRequestHandler]:
    responses: dict[str, Any] = {
        "/v1/traces": trace_service_pb2.ExportTraceServiceResponse,
        "/v1/metrics": metrics_service_pb2.ExportMetricsServiceResponse,
        "/v1/logs": logs_service_pb2.ExportLogsServiceResponse,
    }

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            path = self.path.split("?", 1)[0]
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            response = responses.get(path)
            if response is None:
                return self._reply(404, b"not found", "text/plain")
            content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip()
            if content_type != "application/x-protobuf":
                return self._reply(415, b"only application/x-protobuf", "text/plain")
            try:
                if (self.headers.get("Content-Encoding") or "").lower() == "gzip":
                    body = gzip.decompress(body)
                if path == "/v1/traces":
                    request = trace_service_pb2.ExportTraceServiceRequest()
                    request.ParseFromString(body)
                    receiver.add(spans_from_request(request))
                elif path == "/v1/metrics" and receiver.on_metrics is not None:
                    metrics = MetricsRequest()
                    metrics.ParseFromString(body)
                    receiver.on_metrics(metrics)
            except Exception as exc:  # noqa: BLE001 - a bad body is the client's problem
                return self._reply(400, str(exc).encode(), "text/plain")
            self._reply(200, response().SerializeToString(), "application/x-protobuf")

        def _reply(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

    return Handler


# -- OTLP/gRPC -------------------------------------------------------------------------


def _start_grpc(receiver: OTLPReceiver, host: str, port: int) -> tuple[Any, int]:
    from concurrent import futures

    import grpc
    from opentelemetry.proto.collector.logs.v1 import logs_service_pb2_grpc
    from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

    class Traces(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request: Any, context: Any) -> Any:  # noqa: N802
            receiver.add(spans_from_request(request))
            return trace_service_pb2.ExportTraceServiceResponse()

    class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
        def Export(self, request: Any, context: Any) -> Any:  # noqa: N802
            if receiver.on_metrics is not None:
                receiver.on_metrics(request)
            return metrics_service_pb2.ExportMetricsServiceResponse()

    class Logs(logs_service_pb2_grpc.LogsServiceServicer):
        def Export(self, request: Any, context: Any) -> Any:  # noqa: N802
            return logs_service_pb2.ExportLogsServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="otlp-grpc"))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
        Traces(), server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(  # type: ignore[no-untyped-call]
        Metrics(), server)
    logs_service_pb2_grpc.add_LogsServiceServicer_to_server(  # type: ignore[no-untyped-call]
        Logs(), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if not bound:
        raise OSError(f"could not bind gRPC receiver to {host}:{port}")
    server.start()
    return server, bound


# -- command line ----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--http-port", type=int, default=4318, help="0: any free port")
    parser.add_argument("--grpc-port", type=int, default=None,
                        help="also listen for OTLP/gRPC (needs grpcio); 0: any free port")
    parser.add_argument("--settle", type=float, default=1.5,
                        help="seconds without new spans after which a trace is printed")
    parser.add_argument("--dump", help="write all spans as JSON to this file on exit")
    args = parser.parse_args(argv)
    from metrics_summary import MetricStore, render, summarize  # beside this file

    metrics = MetricStore()
    receiver = OTLPReceiver(
        host=args.host, http_port=args.http_port, grpc=args.grpc_port is not None,
        grpc_port=args.grpc_port or 0, print_traces=True, settle=args.settle,
        on_metrics=metrics.add,
    ).start()
    def terminate(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    print(f"OTLP/HTTP on {receiver.http_endpoint}", flush=True)
    if args.grpc_port is not None:
        print(f"OTLP/gRPC on {receiver.grpc_endpoint}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        receiver.stop()
        if metrics.exports:
            print(render(summarize(metrics.points())), flush=True)
        if args.dump:
            receiver.dump_json(args.dump)
    return 0


if __name__ == "__main__":
    sys.exit(main())
