"""A real Prometheus server for the tests: free port, own storage, a config that scrapes given targets."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.support.servers import free_port, wait_for_port

JOB = "celery"


def binary(name: str) -> str:
    """prometheus / promtool from PATH; CI installs Debian's (.ci/run)."""
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} is not installed (.ci/run installs Debian's prometheus package)")
    return found


class Prometheus:
    def __init__(self, url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.url, self.proc, self.log = url, proc, log

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """The instant vector ``expr`` evaluates to (at ``at``, a Unix time, if given)."""
        params = {"query": expr, **({"time": repr(at)} if at is not None else {})}
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{expr!r}: {exc.read().decode(errors='replace')}") from exc
        assert body["status"] == "success", body
        assert body["data"]["resultType"] == "vector", body
        return list(body["data"]["result"])

    def values(self, expr: str, by: str | tuple[str, ...], at: float | None = None) -> dict[Any, float]:
        """``{label value(s): sample value}`` of ``expr``, keyed by the label(s) ``by``."""
        keys = (by,) if isinstance(by, str) else by
        found: dict[Any, float] = {}
        for row in self.query(expr, at):
            key = tuple(row["metric"].get(k, "") for k in keys)
            assert key not in found, f"{expr!r}: two series for {key}"
            found[key[0] if isinstance(by, str) else key] = float(row["value"][1])
        return found

    def wait(self, expr: str, by: str | tuple[str, ...], expected: dict[Any, float],
             timeout: float = 30) -> None:
        """Until ``values(expr, by)`` equals ``expected``."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.values(expr, by)
            if found == expected:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{expr!r} is {found}, not {expected}")
            time.sleep(0.2)


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Until /-/ready answers 200: the port opens before the TSDB is loaded, and queries
    meanwhile answer 503."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise TimeoutError(f"Prometheus at {url} not ready after {timeout}s")
        time.sleep(0.1)


@contextmanager
def prometheus_server(targets: list[str], scrape_interval: str = "500ms") -> Iterator[Prometheus]:
    """A Prometheus scraping ``targets`` (host:port) as job ``celery`` every ``scrape_interval``."""
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="otel-celery-prometheus-"))
    config = workdir / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": scrape_interval, "scrape_timeout": scrape_interval},
        "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": targets}]}],
    }))
    log = workdir / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [binary("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(port, 30, proc)
        _wait_ready(f"http://127.0.0.1:{port}", proc, 60)
        yield Prometheus(f"http://127.0.0.1:{port}", proc, log)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        shutil.rmtree(workdir, ignore_errors=True)
