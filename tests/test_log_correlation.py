"""Every log line Celery or the task writes about a task carries that task's trace, in
the pool child and in the worker's main process; a line about no task carries none."""

from __future__ import annotations

import re
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from celery.exceptions import TimeLimitExceeded, WorkerLostError
from opentelemetry.trace import SpanKind

from tests.conftest import make_app, wait_for
from tests.support.log_file import read_log_records
from tests.support.prefork import prefork_worker
from tests.support.raw import publish_raw
from tests.support.spans import one, span_id, trace_id

LINE = re.compile(
    r"^\[(?P<process>[^\]]+)\] trace=(?P<trace>\w+) span=(?P<span>\w+) "
    r"sampled=(?P<sampled>\w+) service=(?P<service>[^ ]*) \| (?P<message>.*)$"
)
# A parent of our own making for the hand-built message.
RAW_TRACE, RAW_SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


def hexid(value: int, width: int) -> str:
    return format(value, f"0{width}x")


def parsed(log: str) -> list[dict[str, str]]:
    return [m.groupdict() for m in map(LINE.match, log.splitlines()) if m]


def the_line(lines: list[dict[str, str]], fragment: str) -> dict[str, str]:
    found = [line for line in lines if fragment in line["message"]]
    assert len(found) == 1, (fragment, [line["message"] for line in lines])
    return found[0]


def wait_lines(w: Any, *fragments: str, timeout: float = 60) -> list[dict[str, str]]:
    deadline = time.monotonic() + timeout
    while True:
        lines = parsed(w.log())
        if all(any(f in line["message"] for line in lines) for f in fragments):
            return lines
        if time.monotonic() > deadline:
            raise AssertionError(f"no line for some of {fragments}; log tail:\n{w.log()[-3000:]}")
        time.sleep(0.1)


def test_prefork_every_line_about_a_task_carries_its_trace(redis_url, tmp_path, exporter, tracer, producer_side):
    """Received, succeeded, the task's own line, hard time limit, lost child, discarded
    (expired, and revoked by id), unregistered, invalid and rejected: each line and each exported log record carries
    the producer's trace and the right span; "Connected to" and "ready." carry none."""
    records_file = tmp_path / "log-records.jsonl"
    env = {"OTEL_PYTHON_LOG_CORRELATION": "true", "LOG_RECORD_FILE": str(records_file),
           "SPAN_DELAY_MS": "100"}
    with prefork_worker(redis_url, tmp_path, concurrency=2, app_module="tests.support.log_app",
                        env=env) as w:
        app, t = make_app(redis_url, task_default_queue=w.queue)
        w.wait_ready(app)
        revoked_id = str(uuid.uuid4())
        # reply=True: the worker has the id in its revoked set before the message comes.
        assert app.control.revoke(revoked_id, destination=[f"{w.queue}@localhost"], reply=True)
        with tracer.start_as_current_span("request") as root:
            ok = t.log_line.delay("hello")
            revoked = t.add.apply_async((1, 1), task_id=revoked_id)
            expired = t.add.apply_async((1, 1), expires=datetime.now(timezone.utc) - timedelta(seconds=30))
            unknown = app.send_task("t.nope", queue=w.queue)
            rejected = t.reject_me.delay()
            # Their spans are exported before a child is killed below (a killed child
            # takes the spans it has not flushed yet with it).
            w.wait_spans(lambda spans: {ok.id, rejected.id} <= {
                s["attributes"].get("messaging.message.id") for s in spans if s["kind"] == "CONSUMER"})
            limited = t.sleep.apply_async((30,), time_limit=1)
            lost = t.die.delay()
        assert ok.get(timeout=60) == "hello"
        with pytest.raises(TimeLimitExceeded):
            limited.get(timeout=60)
        with pytest.raises(WorkerLostError):
            lost.get(timeout=60)
        invalid = publish_raw(app, "t.add", (1, 2), queue=w.queue, headers={
            "eta": "not a date", "traceparent": f"00-{RAW_TRACE}-{RAW_SPAN}-01"})
        wait_lines(w, f"Discarding revoked task: t.add[{expired.id}]", f"Discarding revoked task: t.add[{revoked.id}]", "Received unregistered task",
                   "Received invalid task message", f"t.reject_me[{rejected.id}]")
        w.stop()
        spans = w.spans()
        log = w.log()
    records = read_log_records(records_file)
    lines = parsed(log)
    trace = hexid(trace_id(root), 32)
    sent = {task_id: hexid(span_id(wait_for(lambda ps, i=task_id: one(ps, i, SpanKind.PRODUCER))), 16)
            for task_id in (ok.id, limited.id, lost.id, expired.id, revoked.id, unknown.id, rejected.id)}
    process = {s["attributes"]["messaging.message.id"]: s["span_id"]
               for s in spans if s["kind"] == "CONSUMER"}
    expected = {
        # Worker main process: the producer's span (the task's span is the child's).
        f"Task t.log_line[{ok.id}] received": ("MainProcess", trace, sent[ok.id]),
        f"Hard time limit (1s) exceeded for t.sleep[{limited.id}]": ("MainProcess", trace, sent[limited.id]),
        "Task handler raised error: TimeLimitExceeded(1)": ("MainProcess", trace, sent[limited.id]),
        "Task handler raised error: WorkerLostError(": ("MainProcess", trace, sent[lost.id]),
        f"Discarding revoked task: t.add[{expired.id}]": ("MainProcess", trace, sent[expired.id]),
        f"Discarding revoked task: t.add[{revoked.id}]": ("MainProcess", trace, sent[revoked.id]),
        "Received unregistered task of type 't.nope'": ("MainProcess", trace, sent[unknown.id]),
        "Received invalid task message": ("MainProcess", RAW_TRACE, RAW_SPAN),
        # Pool child: the task's own CONSUMER span.
        "task says hello": ("ForkPoolWorker", trace, process[ok.id]),
        f"Task t.log_line[{ok.id}] succeeded in": ("ForkPoolWorker", trace, process[ok.id]),
        f"Task t.reject_me[{rejected.id}] reject requeue=False": ("ForkPoolWorker", trace, process[rejected.id]),
    }
    for fragment, (where, trace_hex, span_hex) in expected.items():
        line = the_line(lines, fragment)
        assert line["process"].startswith(where), (fragment, line)
        assert (line["trace"], line["span"], line["sampled"], line["service"]) == (
            trace_hex, span_hex, "True", "worker"), fragment
        (record,) = [r for r in records if fragment in r["body"]]
        assert (record["trace_id"], record["span_id"]) == (trace_hex, span_hex), fragment
    for about_no_task in ("Connected to redis://", f"{w.queue}@localhost ready."):
        line = the_line(lines, about_no_task)
        assert (line["trace"], line["span"], line["sampled"]) == ("0", "0", "False")
        (record,) = [r for r in records if about_no_task in r["body"]]
        assert (record["trace_id"], record["span_id"]) == ("0" * 32, "0" * 16)


@pytest.mark.parametrize("pool", ["solo", "threads"])
def test_one_process_pools_lines_carry_the_trace(pool, redis_url, tmp_path, exporter, tracer, producer_side):
    """Solo and threads: the task runs in the consuming process; its lines carry its
    process span, "received", "Discarding revoked task" and "Received unregistered task"
    the producer's span; "ready." carries none."""
    records_file = tmp_path / "log-records.jsonl"
    env = {"OTEL_PYTHON_LOG_CORRELATION": "true", "LOG_RECORD_FILE": str(records_file),
           "SPAN_DELAY_MS": "100"}
    with prefork_worker(redis_url, tmp_path, pool=pool, concurrency=2,
                        app_module="tests.support.log_app", env=env) as w:
        app, t = make_app(redis_url, task_default_queue=w.queue)
        w.wait_ready(app)
        with tracer.start_as_current_span("request") as root:
            ok = t.log_line.delay("hello")
            expired = t.add.apply_async((1, 1), expires=datetime.now(timezone.utc) - timedelta(seconds=30))
            unknown = app.send_task("t.nope", queue=w.queue)
        assert ok.get(timeout=60) == "hello"
        wait_lines(w, f"Discarding revoked task: t.add[{expired.id}]", "Received unregistered task")
        w.stop()
        spans = w.spans()
        log = w.log()
    records = read_log_records(records_file)
    lines = parsed(log)
    trace = hexid(trace_id(root), 32)
    sent = {task_id: hexid(span_id(wait_for(lambda ps, i=task_id: one(ps, i, SpanKind.PRODUCER))), 16)
            for task_id in (ok.id, expired.id, unknown.id)}
    (process,) = [s["span_id"] for s in spans if s["kind"] == "CONSUMER"
                  and s["attributes"]["messaging.message.id"] == ok.id]
    expected = {
        f"Task t.log_line[{ok.id}] received": sent[ok.id],
        "task says hello": process,
        f"Task t.log_line[{ok.id}] succeeded in": process,
        f"Discarding revoked task: t.add[{expired.id}]": sent[expired.id],
        "Received unregistered task of type 't.nope'": sent[unknown.id],
    }
    for fragment, span_hex in expected.items():
        line = the_line(lines, fragment)
        assert (line["trace"], line["span"]) == (trace, span_hex), fragment
        (record,) = [r for r in records if fragment in r["body"]]
        assert (record["trace_id"], record["span_id"]) == (trace, span_hex), fragment
    line = the_line(lines, f"{w.queue}@localhost ready.")
    assert (line["trace"], line["span"]) == ("0", "0")


def test_without_log_correlation_the_strategy_is_celerys_own():
    """No record factory and no OpenTelemetry handler: the handler Celery built is
    returned as is, and no Request hook makes a context current."""
    import logging
    from types import SimpleNamespace

    from otel_celery_headers.logcontext import LogContext
    from otel_celery_headers.options import Options

    assert logging.getLogRecordFactory() is logging.LogRecord
    logs = LogContext(Options())

    def handler(*args: Any) -> None:
        pass

    assert logs.wrap_strategy(lambda *a, **k: handler, None, (SimpleNamespace(name="t.add"),), {}) is handler
    assert logs.on is False
    assert logs.enter_request(SimpleNamespace(task=SimpleNamespace(name="t.add"))) is None


def test_excluded_link_and_ignore_tasks_lend_their_lines_no_trace():
    """A task in exclude_tasks, or of trace shape link or ignore: the main process makes
    no producer's span current for its lines (its trace starts in the child, or never)."""
    from types import SimpleNamespace

    from opentelemetry import context as otel_context
    from opentelemetry import trace

    from otel_celery_headers import options
    from otel_celery_headers.logcontext import LogContext

    opts = options.load({"exclude_tasks": ["t.excluded"],
                         "trace_shape": {"t.linked": "link", "t.ignored": "ignore"}})
    logs = LogContext(opts)
    logs.on = True

    def current_trace_of(name: str) -> str:
        headers = {"task": name, "traceparent": f"00-{RAW_TRACE}-{RAW_SPAN}-01"}
        request = SimpleNamespace(task=SimpleNamespace(name=name), request_dict=headers,
                                  _message=SimpleNamespace(headers=headers))
        token = logs.enter_request(request)
        try:
            return hexid(trace.get_current_span().get_span_context().trace_id, 32)
        finally:
            if token is not None:
                otel_context.detach(token)

    assert current_trace_of("t.child") == RAW_TRACE
    assert current_trace_of("t.excluded") == "0" * 32
    assert current_trace_of("t.linked") == "0" * 32
    assert current_trace_of("t.ignored") == "0" * 32


def test_a_call_under_trace_shape_link_lends_its_lines_no_trace(redis_url, tmp_path, exporter, tracer, producer_side):
    """A task published under ``with trace_shape("link")`` (the shape carried in the
    message): the main process's "received" line and, for a countdown task revoked by
    id, its "Discarding revoked task" line carry no trace; a task published beside it
    without the block still lends the caller's trace to its "received" line."""
    from otel_celery_headers import trace_shape

    env = {"OTEL_PYTHON_LOG_CORRELATION": "true", "LOG_RECORD_FILE": str(tmp_path / "records.jsonl")}
    with prefork_worker(redis_url, tmp_path, pool="solo", concurrency=1,
                        app_module="tests.support.log_app", env=env) as w:
        app, t = make_app(redis_url, task_default_queue=w.queue)
        w.wait_ready(app)
        with tracer.start_as_current_span("request") as root:
            with trace_shape("link"):
                linked = t.log_line.delay("linked")
                later = t.add.apply_async((1, 1), countdown=8)
            child = t.log_line.delay("child")
        assert linked.get(timeout=60) == "linked"
        assert child.get(timeout=60) == "child"
        wait_lines(w, f"Task t.add[{later.id}] received")
        # The worker holds it until its eta: revoked now, it is discarded when it leaves
        # the timer (Request.execute_using_pool), not in the strategy's handler.
        assert app.control.revoke(later.id, destination=[f"{w.queue}@localhost"], reply=True)
        lines = wait_lines(w, f"Discarding revoked task: t.add[{later.id}]", timeout=60)
    trace = hexid(trace_id(root), 32)
    for fragment in (f"Task t.log_line[{linked.id}] received", f"Task t.add[{later.id}] received",
                     f"Discarding revoked task: t.add[{later.id}]"):
        line = the_line(lines, fragment)
        assert (line["trace"], line["span"]) == ("0", "0"), (fragment, line)
    assert the_line(lines, f"Task t.log_line[{child.id}] received")["trace"] == trace


def test_a_protocol_1_message_lends_its_lines_the_trace_in_its_headers():
    """Protocol 1 keeps the task's fields in the body and our context in the message's
    headers: the main process's lines about it (received, unknown, invalid) carry the trace
    the headers name, and the task's own name and id come from the body."""
    import json

    from kombu import Message
    from opentelemetry import context as otel_context
    from opentelemetry import trace

    from otel_celery_headers import options
    from otel_celery_headers.carrier import CONTEXT_HEADER
    from otel_celery_headers.logcontext import LogContext, message_fields

    headers = {"traceparent": f"00-{RAW_TRACE}-{RAW_SPAN}-01", CONTEXT_HEADER: "traceparent"}
    body = json.dumps({"task": "t.v1", "id": "v1-id", "args": [], "kwargs": {}})
    message = Message(body=body, content_type="application/json", content_encoding="utf-8",
                      headers=headers)
    fields = message_fields(message)
    assert (fields.task, fields.id) == ("t.v1", "v1-id")  # type: ignore[attr-defined]
    logs = LogContext(options.load({}))
    logs.on = True
    token = logs._enter_message(message, "t.v1")
    try:
        context = trace.get_current_span().get_span_context()
        assert (hexid(context.trace_id, 32), hexid(context.span_id, 16)) == (RAW_TRACE, RAW_SPAN)
    finally:
        assert token is not None
        otel_context.detach(token)
