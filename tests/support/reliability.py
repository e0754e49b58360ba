"""Helpers of the reliability tests: a Redis that restarts on its port, faulty exporters,
a capture of our logger, pool children of a worker, and workers of other pools.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from tests.support.prefork import prefork_worker
from tests.support.servers import free_port, redis_binary, wait_for_port

# -- a Redis that can be stopped and started again on the same port ---------------------


class RestartableRedis:
    """A throwaway redis-server on a fixed port: ``stop()`` kills it, ``start()`` brings it back."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self._workdir = tempfile.mkdtemp(prefix="otel-celery-restart-")
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self._proc is None, "already running"
        self._proc = subprocess.Popen(
            [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self._workdir, "--protected-mode", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, 15, self._proc)

    def stop(self) -> None:
        """Stop the server the hard way (SIGKILL): clients see refused connections."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(10)
            self._proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._workdir, ignore_errors=True)


@contextmanager
def restartable_redis() -> Iterator[RestartableRedis]:
    server = RestartableRedis()
    server.start()
    try:
        yield server
    finally:
        server.close()


# -- exporters that fail ----------------------------------------------------------------


class RaisingExporter(SpanExporter):
    """Raises on every export, as an exporter with a bug (or a bad endpoint URL) would."""

    def __init__(self) -> None:
        self.calls = 0
        self.threads: set[int] = set()  # idents of the threads export() ran on

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.calls += 1
        self.threads.add(threading.get_ident())
        raise RuntimeError("exporter is broken")

    def shutdown(self) -> None:
        pass


class BlockingExporter(SpanExporter):
    """Takes ``seconds`` per export, as a collector that does not answer would; ``release()`` ends that."""

    def __init__(self, seconds: float = 1.0) -> None:
        self.seconds = seconds
        self.calls = 0
        self.threads: set[int] = set()  # idents of the threads export() ran on
        self._released = threading.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.calls += 1
        self.threads.add(threading.get_ident())
        self._released.wait(self.seconds)
        return SpanExportResult.SUCCESS

    def release(self) -> None:
        self._released.set()

    def shutdown(self) -> None:
        self.release()


# -- our logger -------------------------------------------------------------------------


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def capture_our_logger() -> Iterator[list[logging.LogRecord]]:
    """Every record of the "otel_celery_headers" logger, at any level, while inside.

    The log-once memory of ``_guard.report`` is emptied first and restored after, so an
    error of a kind already logged by an earlier test is logged (and seen) again.
    """
    from otel_celery_headers import _guard

    logger = logging.getLogger("otel_celery_headers")
    handler = _ListHandler()
    saved_seen, saved_level = _guard._seen, logger.level
    _guard._seen = set()
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved_level)
        _guard._seen = saved_seen


# -- processes --------------------------------------------------------------------------


def children_of(pid: int) -> set[int]:
    """Live (not zombie) child processes of ``pid``, from /proc."""
    found: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, ppid = fields[0], int(fields[1])
        if ppid == pid and state not in ("Z", "X"):
            found.add(int(entry))
    return found


def wait_until(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def pool_worker(
    broker_url: str, tmp_path: Path, *, pool: str, concurrency: int,
    extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None,
) -> Any:
    """A `celery -A tests.support.green_app worker --pool <pool>` subprocess.

    Same handle as ``prefork_worker``; the app module also has the ``r.rendezvous`` task.
    """
    return prefork_worker(
        broker_url, tmp_path, concurrency=concurrency, extra_args=extra_args, env=env,
        app_module="tests.support.green_app", pool=pool,
    )
