"""No silent nothing: instrumented without an SDK, a process says so once, and only then."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WARNING = "otel-celery-headers: no OpenTelemetry SDK is configured in this process"


def run(redis_url: str, mode: str) -> tuple[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # The test process's own OTEL_* settings must not reach the child's SDK set-up.
    for key in [k for k in env if k.startswith("OTEL_")]:
        del env[key]
    done = subprocess.run(
        [sys.executable, "-m", "tests.support.sdk_warning_app", redis_url, mode],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout, done.stderr


def test_no_sdk_warns_once_and_tasks_still_run(redis_url):
    """Without an SDK: 3 publishes and 3 tasks in one process log the warning exactly once, naming what to install; every task still runs."""
    stdout, stderr = run(redis_url, "none")
    assert "results: [0, 2, 4]" in stdout
    lines = [line for line in stderr.splitlines() if WARNING in line]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("WARNING ")
    assert "ProxyTracerProvider" in lines[0]
    assert "opentelemetry-distro" in lines[0] and "OTEL_EXPORTER_OTLP_ENDPOINT" in lines[0]


@pytest.mark.parametrize("mode", ["after", "explicit"])
def test_a_configured_provider_gives_no_warning(redis_url, mode):
    """A TracerProvider set after instrument() (before the first message), or passed to instrument(): no warning at all."""
    stdout, stderr = run(redis_url, mode)
    assert "results: [0, 2, 4]" in stdout
    assert WARNING not in stderr
