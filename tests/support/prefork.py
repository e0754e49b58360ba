"""A `celery worker --pool prefork` subprocess writing its spans to a JSON-lines file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.support.file_exporter import read_spans
from tests.support.metric_file import read_points

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def prefork_worker(
    broker_url: str, tmp_path: Path, *, concurrency: int = 2, max_tasks_per_child: int | None = None,
    instrument_at: str = "import", extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None,
    app_module: str = "tests.support.worker_app", pool: str = "prefork", metrics: bool = False,
    queue: str | None = None,
) -> Iterator[Any]:
    """A `celery -A <app_module> worker --pool <pool>` subprocess (prefork unless told), on a
    queue of its own unless ``queue`` names one (a second worker taking over the first's)."""
    token = uuid.uuid4().hex[:8]
    queue = queue or f"q-{token}"
    span_file = tmp_path / f"spans-{token}.jsonl"
    metric_file = tmp_path / f"metrics-{token}.jsonl"
    log_file = tmp_path / f"worker-{token}.log"
    args = [
        sys.executable, "-m", "celery", "-A", app_module, "worker",
        "--pool", pool, "--concurrency", str(concurrency), "-Q", queue,
        "--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel", "INFO",
        "--hostname", f"{queue}@localhost", *extra_args,
    ]
    if max_tasks_per_child is not None:
        args += ["--max-tasks-per-child", str(max_tasks_per_child)]
    full_env = dict(
        os.environ, BROKER_URL=broker_url, SPAN_FILE=str(span_file), QUEUE=queue,
        INSTRUMENT_AT=instrument_at,
        # Keep a caller's PYTHONPATH (e.g. src/ of a checkout run without installing).
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        **({"METRIC_FILE": str(metric_file)} if metrics else {}),
        **(env or {}),
    )
    with open(log_file, "wb") as log:
        proc = subprocess.Popen(args, cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    handle = _Worker(proc, queue, span_file, log_file, metric_file)
    try:
        yield handle
    finally:
        handle.stop()


class _Worker:
    def __init__(self, proc: subprocess.Popen[bytes], queue: str, span_file: Path, log_file: Path,
                 metric_file: Path):
        self.proc, self.queue, self.span_file, self.log_file = proc, queue, span_file, log_file
        self.metric_file = metric_file

    def wait_ready(self, app: Any, timeout: float = 60) -> None:
        """Until the worker answers a ping: remote control (revoke) reaches only live workers."""
        deadline = time.monotonic() + timeout
        while not app.control.ping(destination=[f"{self.queue}@localhost"], timeout=0.5):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"worker not ready; log tail:\n{self.log()[-3000:]}")

    def spans(self) -> list[dict[str, Any]]:
        return read_spans(self.span_file)

    def wait_spans(self, predicate: Any, timeout: float = 30) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            found = predicate(self.spans())
            if found:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out; {len(self.spans())} spans in file; worker log tail:\n{self.log()[-3000:]}"
                )
            time.sleep(0.1)

    def metric_points(self) -> list[dict[str, Any]]:
        """Every metric point exported so far (the worker must run with METRIC_FILE)."""
        return read_points(self.metric_file)

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def stop(self) -> None:
        """Warm shutdown (SIGTERM): children exit through billiard's normal path."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
