"""Load: thousands of tasks through a prefork worker, spans over OTLP, nothing lost or doubled.

CI runs SOAK_TASKS=2000 (the default); the full soak of the reliability table is
`SOAK_TASKS=20000 pytest tests/test_soak.py`.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any

from opentelemetry.trace import SpanKind

from tests.conftest import EXPORTER, instrument, make_app
from tests.support.prefork import prefork_worker
from tests.support.spans import attr, span_id, trace_id

SOAK_TASKS = int(os.environ.get("SOAK_TASKS", "2000"))
RECEIVER = Path(__file__).resolve().parents[1] / "examples" / "fastapi_celery" / "otlp_receiver.py"


def load_receiver() -> Any:
    module = sys.modules.get("otlp_receiver")
    if module is None:
        spec = importlib.util.spec_from_file_location("otlp_receiver", RECEIVER)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["otlp_receiver"] = module
        spec.loader.exec_module(module)
    return module


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def worker_pids(main_pid: int) -> list[int]:
    children = Path(f"/proc/{main_pid}/task/{main_pid}/children").read_text().split()
    return [main_pid, *map(int, children)]


def publish(t: Any, tracer: Any, count: int, batch: int = 100) -> dict[str, tuple[int, int]]:
    """Publish ``count`` tasks, ``batch`` per request span; task id -> (trace, publish span)."""
    ids: list[str] = []
    for start in range(0, count, batch):
        with tracer.start_as_current_span("request"):
            ids += [t.add.delay(i, 1).id for i in range(start, min(start + batch, count))]
    producers = {attr(s, "messaging.message.id"): s for s in EXPORTER.get_finished_spans()
                 if s.kind == SpanKind.PRODUCER}
    return {i: (trace_id(producers[i]), span_id(producers[i])) for i in ids}


def test_soak_every_execution_has_exactly_one_span_in_its_producers_trace(redis_url, tmp_path, exporter, tracer):
    """SOAK_TASKS tasks through prefork (concurrency 2), spans over OTLP: none lost, none doubled, none open; worker RSS flat."""
    otlp = load_receiver()
    instrumentor = instrument()
    try:
        with otlp.OTLPReceiver(http=True) as receiver, prefork_worker(
            redis_url, tmp_path, concurrency=2, env={"OTLP_TRACES_URL": receiver.traces_url},
        ) as w:
            app, t = make_app(redis_url, task_default_queue=w.queue)
            warmup = [t.add.delay(i, 1) for i in range(300)]
            assert [r.get(timeout=60) for r in warmup][-1] == 300
            time.sleep(1)
            pids = worker_pids(w.proc.pid)
            rss_before = rss_kib(pids)

            exporter.clear()
            expected = publish(t, tracer, SOAK_TASKS)
            last = app.AsyncResult(list(expected)[-1])
            deadline = time.monotonic() + 30 + SOAK_TASKS / 50
            while not last.ready() and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(1)
            rss_after = rss_kib(pids)
            w.stop()  # children flush on exit; the SDK's batches drain
            receiver.wait_quiet(quiet=1.5, timeout=60)
            spans = receiver.spans()
    finally:
        instrumentor.uninstrument()

    consumers: dict[str, list[dict]] = {}
    for span in spans:
        if span["kind"] == "CONSUMER":
            consumers.setdefault(span["attributes"].get("messaging.message.id"), []).append(span)
    lost = [i for i in expected if i not in consumers]
    doubled = [i for i, found in consumers.items() if i in expected and len(found) > 1]
    assert not lost, f"{len(lost)} of {len(expected)} executions have no span"
    assert not doubled, f"{len(doubled)} executions have more than one span"
    for task_id, (producer_trace, producer_span) in expected.items():
        (span,) = consumers[task_id]
        assert span["trace_id"] == format(producer_trace, "032x")
        assert span["parent_span_id"] == format(producer_span, "016x")
        assert span["end_ns"] >= span["start_ns"] > 0
    growth_mb = (rss_after - rss_before) / 1024
    print(f"soak: {SOAK_TASKS} tasks, worker RSS {rss_before / 1024:.1f} -> {rss_after / 1024:.1f} MB "
          f"({growth_mb:+.2f} MB over {len(pids)} processes)")
    assert growth_mb < 5
