"""A fleet of hosts on one machine: a network namespace per host, veth links between them.

Each host is a namespace of its own (``ip netns add``) with its loopback up; a
``link(a, b)`` is a veth pair with one end in each, a /30 of its own, so two hosts
talk only over the links the test made (and each host to itself over loopback).
Nothing is added to the machine's own namespace: the veth ends are created directly
inside their namespaces, so their names never meet those of another run.

Processes run on a host through ``ip netns exec``; ``Host.kill_all`` ends every
process whose network namespace is the host's (``ip netns pids``), the way a host
that loses power ends them all at once; ``Link.down`` cuts a link (both ends
administratively down: each side's route to the other goes away, nothing is sent,
no FIN or RST reaches the peer: a partition, not a close) until ``Link.up``.
The test process itself can act on a host with ``Host.call``: a thread that joins
the host's namespace (``setns`` is per thread for network namespaces) runs the
function, and sockets it creates belong to that namespace for their lifetime.

Names: ``ocf-<pid>-<random>-<host>``, unique per run. ``fleet()`` deletes every
namespace (and with it every veth), after killing its processes, on the way out
whatever the test did; a run that was itself killed leaves namespaces behind, and
the next ``fleet()`` removes those whose pid is no longer alive.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TypeVar

T = TypeVar("T")

PREFIX = "ocf-"
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def netns_pids(netns: str) -> list[int]:
    """Pids of the processes living in ``netns`` (empty once it is gone)."""
    done = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True,
                          timeout=30)
    return [int(p) for p in done.stdout.split()]


def _kill_every_process(netns: str, timeout: float = 15) -> int:
    """SIGSTOP every process of ``netns``, then SIGKILL them: none sees another die
    (a Celery main process that saw its pool children vanish would act on it).
    Repeated until none is left, for one forked in the meantime. Returns how many."""
    killed: set[int] = set()
    deadline = time.monotonic() + timeout
    while True:
        pids = [p for p in netns_pids(netns) if p != os.getpid()]
        if not pids:
            return len(killed)
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes of {netns} survive SIGKILL: {pids}")
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for pid in pids:
                _signal(pid, sig)
        killed.update(pids)
        time.sleep(0.02)  # let the kernel reap them out of the namespace


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


class Host:
    def __init__(self, fleet: Fleet, name: str) -> None:
        self.name = name
        self.netns = f"{fleet.tag}-{name}"
        self._fleet = fleet
        self.procs: list[subprocess.Popen[bytes]] = []

    def popen(self, argv: Sequence[str], *, env: dict[str, str], log: Path | None = None,
              cwd: str | Path | None = None) -> subprocess.Popen[bytes]:
        """Start ``argv`` on this host; its output goes to ``log`` (else nowhere)."""
        out: IO[bytes] | int = open(log, "ab") if log is not None else subprocess.DEVNULL
        try:
            proc = subprocess.Popen(["ip", "netns", "exec", self.netns, *argv], env=env,
                                    cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        finally:
            if not isinstance(out, int):
                out.close()
        self.procs.append(proc)
        return proc

    def freeze(self) -> None:
        """SIGSTOP every process of the host (``thaw`` or ``kill_all`` next): a test
        can look at a still host, then decide to kill it in that very state."""
        for pid in netns_pids(self.netns):
            _signal(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        for pid in netns_pids(self.netns):
            _signal(pid, signal.SIGCONT)

    def kill_all(self) -> int:
        """The host dies whole: every process of it SIGKILLed at once. Returns how many."""
        count = _kill_every_process(self.netns)
        self._reap()
        return count

    def _reap(self) -> None:
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass

    def call(self, fn: Callable[[], T], timeout: float = 120) -> T:
        """``fn()`` on a thread inside this host's namespace; its result or its exception."""
        box: dict[str, object] = {}

        def run() -> None:
            try:
                fd = os.open(f"/run/netns/{self.netns}", os.O_RDONLY)
                try:
                    if _libc.setns(fd, _CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), f"setns into {self.netns}")
                finally:
                    os.close(fd)
                box["value"] = fn()
            except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
                box["error"] = exc

        thread = threading.Thread(target=run, name=f"in-{self.name}", daemon=True)
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError(f"{fn!r} on {self.name} still running after {timeout}s")
        if "error" in box:
            raise box["error"]  # type: ignore[misc]
        return box["value"]  # type: ignore[return-value]


class Link:
    """A veth pair between two hosts: ``a`` is .1, ``b`` is .2 of 10.99.<n>.0/30."""

    def __init__(self, a: Host, b: Host, n: int) -> None:
        self.a, self.b = a, b
        self.devs = {a.name: f"to-{b.name}"[:15], b.name: f"to-{a.name}"[:15]}
        self.addrs = {a.name: f"10.99.{n}.1", b.name: f"10.99.{n}.2"}
        _ip("link", "add", self.devs[a.name], "netns", a.netns, "type", "veth",
            "peer", "name", self.devs[b.name], "netns", b.netns)
        for host in (a, b):
            _ip("-n", host.netns, "addr", "add", f"{self.addrs[host.name]}/30",
                "dev", self.devs[host.name])
        self.up()

    def address(self, host: Host) -> str:
        """The address ``host`` has on this link (what the other end connects to)."""
        return self.addrs[host.name]

    def down(self) -> None:
        for host in (self.a, self.b):
            _ip("-n", host.netns, "link", "set", self.devs[host.name], "down")

    def up(self) -> None:
        for host in (self.a, self.b):
            _ip("-n", host.netns, "link", "set", self.devs[host.name], "up")


class Fleet:
    def __init__(self) -> None:
        self.tag = f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.hosts: dict[str, Host] = {}
        self.links: list[Link] = []

    def host(self, name: str) -> Host:
        host = Host(self, name)
        _ip("netns", "add", host.netns)
        self.hosts[name] = host
        _ip("-n", host.netns, "link", "set", "lo", "up")
        return host

    def link(self, a: Host, b: Host) -> Link:
        link = Link(a, b, len(self.links) + 1)
        self.links.append(link)
        return link

    def close(self) -> None:
        """Every process of every host killed, every namespace (and veth) deleted."""
        errors: list[BaseException] = []
        for host in self.hosts.values():
            try:
                _kill_every_process(host.netns)
                host._reap()
            except Exception as exc:  # noqa: BLE001 - clean the other hosts, then raise
                errors.append(exc)
        for host in self.hosts.values():
            try:
                _ip("netns", "delete", host.netns)
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
        if errors:
            raise errors[0]


def remove_stale() -> None:
    """Delete the namespaces of earlier runs whose process is gone (a killed pytest)."""
    for line in _ip("netns", "list").splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(PREFIX):
            continue
        pid = name[len(PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            _kill_every_process(name)
            _ip("netns", "delete", name)


@contextmanager
def fleet() -> Iterator[Fleet]:
    if os.geteuid() != 0:
        raise RuntimeError("a fleet needs root: ip netns add (.ci/run runs as root)")
    remove_stale()
    made = Fleet()
    try:
        yield made
    finally:
        made.close()


# -- servers on a host --------------------------------------------------------------------


def redis_on(host: Host, workdir: Path, port: int = 6379, timeout: float = 15) -> int:
    """A throwaway redis-server on ``host``, listening on all its addresses."""
    from tests.support.servers import redis_binary, wait_for_port

    workdir.mkdir(parents=True, exist_ok=True)
    proc = host.popen(
        [redis_binary(), "--port", str(port), "--bind", "0.0.0.0", "--save", "",
         "--appendonly", "no", "--dir", str(workdir), "--protected-mode", "no"],
        env=dict(os.environ), log=workdir / "redis.log",
    )
    host.call(lambda: wait_for_port(port, timeout, proc))
    return port


def rabbitmq_on(host: Host, workdir: Path, port: int = 5672, timeout: float = 120) -> int:
    """A throwaway RabbitMQ node on ``host`` (its own node, epmd and directories);
    ``Fleet.close`` kills it with the host's other processes."""
    from tests.support.servers import _wait_amqp, wait_for_port

    binary = "/usr/lib/rabbitmq/bin/rabbitmq-server"  # not /usr/sbin's: see servers.py
    if not os.path.exists(binary):
        raise RuntimeError("rabbitmq-server is not installed (.ci/run installs it)")
    workdir.mkdir(parents=True, exist_ok=True)
    plugins = workdir / "enabled_plugins"
    plugins.write_text("[].\n")
    # guest may connect from other hosts: RabbitMQ allows it only over loopback unless told.
    (workdir / "rabbitmq.conf").write_text("loopback_users = none\n")
    env = dict(
        os.environ,
        RABBITMQ_NODENAME=f"fleet{port}@localhost",  # epmd of this namespace: no clash
        RABBITMQ_NODE_IP_ADDRESS="0.0.0.0",
        RABBITMQ_NODE_PORT=str(port),
        RABBITMQ_DIST_PORT=str(port + 20000),
        RABBITMQ_MNESIA_BASE=str(workdir / "mnesia"),
        RABBITMQ_LOG_BASE=str(workdir / "log"),
        RABBITMQ_ENABLED_PLUGINS_FILE=str(plugins),
        RABBITMQ_CONFIG_FILE=str(workdir / "rabbitmq"),
        HOME=str(workdir),
    )
    proc = host.popen([binary], env=env, log=workdir / "rabbitmq.out")
    url = f"amqp://guest:guest@127.0.0.1:{port}//"

    def ready() -> None:
        wait_for_port(port, timeout, proc)
        _wait_amqp(url, 60)

    host.call(ready, timeout=timeout + 70)
    return port
