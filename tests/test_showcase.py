"""One trace that shows what other Celery integrations lose, rendered as a waterfall.

Under one request span, against a prefork `celery worker` subprocess on Redis: a
task with a countdown, a task killed by its hard time limit, a task revoked while it
waited for its eta, and a chord. Everything lands in the caller's trace: the killed
task as an ERROR span from the worker's main process, the revoked task as a REVOKED
span, the countdown task with a time in queue that excludes the countdown, and the
chord body linked to each header task. The waterfall is printed (``pytest -s``) and
written to ``$SHOWCASE_TRACE_FILE`` if set; docs/explanation/reliability.md shows a captured one.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from celery import chord
from celery.exceptions import TimeLimitExceeded
from opentelemetry.sdk.trace import ReadableSpan

from tests.conftest import make_app, wait_for
from tests.support.prefork import prefork_worker

RECEIVER = Path(__file__).resolve().parent.parent / "examples" / "fastapi_celery" / "otlp_receiver.py"


def render_waterfall(spans: list[dict[str, Any]]) -> str:
    module = sys.modules.get("otlp_receiver")
    if module is None:  # by path: the example directory is not put on sys.path
        spec = importlib.util.spec_from_file_location("otlp_receiver", RECEIVER)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["otlp_receiver"] = module
        spec.loader.exec_module(module)
    return str(module.render_waterfall(spans, width=36, title="POST /checkout (test_showcase)"))


def as_receiver_span(span: dict[str, Any], service: str) -> dict[str, Any]:
    """A span of the worker's JSON-lines file, in the demo receiver's shape."""
    return {
        **span, "parent_span_id": span["parent_id"], "service.name": service,
        "duration_ns": span["end_ns"] - span["start_ns"],
        "status": {"code": span["status"], "message": span["status_message"]},
        "links": [{"span_id": link, "attributes": {"celery.link": kind}}
                  for link, kind in zip(span["links"], span.get("link_kinds", []))] or [
                     {"span_id": link, "attributes": {}} for link in span["links"]],
    }


def from_sdk(span: ReadableSpan) -> dict[str, Any]:
    from tests.support.file_exporter import span_to_dict

    return as_receiver_span(span_to_dict(span), "web")


def test_one_trace_shows_time_limit_revoke_queue_time_and_chord_fan_in(
    redis_url, tmp_path, exporter, tracer, producer_side
):
    with prefork_worker(redis_url, tmp_path, concurrency=2) as w:
        app, t = make_app(redis_url, task_default_queue=w.queue)
        w.wait_ready(app)
        with tracer.start_as_current_span("POST /checkout") as root:
            later = t.add.apply_async((2, 2), countdown=1)
            limited = t.sleep.apply_async((30,), time_limit=1)
            revoked = t.add.apply_async((3, 3), countdown=2)
            fan = chord([t.add.s(i, i) for i in range(3)], t.collect.s()).apply_async()
        app.control.revoke(revoked.id)
        assert later.get(timeout=60) == 4
        assert fan.get(timeout=60) == 6
        with pytest.raises(TimeLimitExceeded):
            limited.get(timeout=60)
        # Celery marks the result REVOKED at once, but the worker drops the message (and
        # sends task_revoked) only when its eta comes: wait for that before stopping.
        discarded = f"Discarding revoked task: t.add[{revoked.id}]"
        deadline = time.monotonic() + 30
        while discarded not in w.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert revoked.state == "REVOKED"
        w.stop()
        worker_spans = w.spans()

    ours = format(root.get_span_context().trace_id, "032x")
    web = wait_for(lambda spans: (lambda found: found if len(found) == 7 else None)(
        [s for s in spans if s.context.trace_id == root.get_span_context().trace_id]))
    spans = [from_sdk(s) for s in web] + [
        as_receiver_span(s, "worker") for s in worker_spans if s["trace_id"] == ours]
    by_id = {s["span_id"]: s for s in spans}

    def process(task_id: str) -> dict[str, Any]:
        (found,) = [s for s in spans if s["kind"] == "CONSUMER"
                    and s["attributes"].get("messaging.message.id") == task_id]
        return found

    killed = process(limited.id)
    assert killed["status"]["code"] == "ERROR"
    assert killed["attributes"]["error.type"].endswith("TimeLimitExceeded")
    assert 0.9e9 < killed["duration_ns"] < 10e9  # from the task's start to the kill
    gone = process(revoked.id)
    assert gone["attributes"]["celery.task.state"] == "REVOKED"
    assert gone["status"]["code"] != "ERROR"
    assert 0 <= process(later.id)["attributes"]["celery.message.queue_time"] < 0.9
    body = process(fan.id)
    headers = [s for s in spans if s["kind"] == "CONSUMER" and s["name"] == "process t.add"
               and s["attributes"].get("celery.task.group_id")]
    assert len(headers) == 3
    assert sorted(link["span_id"] for link in body["links"]) == sorted(s["span_id"] for s in headers)
    # Every span is connected to the request: nothing is an orphan in another trace.
    for span in spans:
        while span["parent_span_id"] is not None:
            span = by_id[span["parent_span_id"]]
        assert span["name"] == "POST /checkout"

    text = render_waterfall(spans)
    print("\n" + text)
    out = os.environ.get("SHOWCASE_TRACE_FILE")
    if out:
        Path(out).write_text(text + "\n")
