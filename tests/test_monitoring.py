"""monitoring/ (issue 16, item 4): the Grafana dashboard and the Prometheus alert rules.

The rules pass promtool's checks and unit tests; the committed dashboard JSON is its
generator's output; and end to end, a real prefork worker exports through the
OpenTelemetry Prometheus exporter (tests/support/prometheus_app.py), a real Prometheus
scrapes it, and every dashboard panel's query and every alert's expression, read out
of the committed files, gives what a known workload implies.

Why the workload has a warm-up: Prometheus' ``rate()`` and ``increase()`` count
from a series' first sample, and a series appears when its first point is recorded.
The warm-up makes the t.work and t.nap series exist before the measured workload,
as on a worker that has been running; t.die and t.stuck appear in the workload, so
the rate panels do not count them (Prometheus behaviour) while the in-range counts
and the lost-child alert do (their count_in_range / ``unless ... offset`` form).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import yaml
from celery import Celery

from tests.support.prometheus import JOB, Prometheus, binary, prometheus_server
from tests.support.servers import free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "monitoring" / "grafana" / "celery.json"
ALERTS = ROOT / "monitoring" / "prometheus" / "alerts.yaml"
RULE_TESTS = ROOT / "monitoring" / "prometheus" / "tests.yaml"
LOST = "billiard.exceptions.WorkerLostError"
TIME_LIMIT = "billiard.exceptions.TimeLimitExceeded"
# The range the test reads panels over: longer than the test, so every series is
# younger than it (and rate() * RANGE_S is the increase since a series' first sample).
RANGE, RANGE_S = "1h", 3600.0
BACKLOG = 101  # messages left waiting in the queue of the two blocked workers


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([binary("promtool"), *args], capture_output=True, text=True, timeout=60)


def test_alert_rules_pass_promtool_check():
    """promtool check rules: the rules parse, and every expression is valid PromQL."""
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout


def test_alert_rules_unit_tests_pass():
    """promtool test rules: each alert fires in one case and stays quiet in another."""
    result = promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    cases = [test for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]
             for test in case["alert_rule_test"]]
    fired = {test["alertname"] for test in cases if test["exp_alerts"]}
    quiet = {test["alertname"] for test in cases if not test["exp_alerts"]}
    assert fired == quiet == set(alerts())


def test_committed_dashboard_is_the_generators_output():
    """monitoring/grafana/celery.json is what monitoring/grafana/dashboard.py renders."""
    spec = importlib.util.spec_from_file_location("dashboard", ROOT / "monitoring" / "grafana" / "dashboard.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert DASHBOARD.read_text() == module.render()
    variables = {v["name"] for v in json.loads(DASHBOARD.read_text())["templating"]["list"]}
    assert variables == {"datasource", "job", "instance", "queue", "task"}


def alerts(groups: tuple[str, ...] | None = None) -> dict[str, str]:
    """alert name -> expression, of every group (or of the groups named)."""
    return {rule["alert"]: rule["expr"] for group in yaml.safe_load(ALERTS.read_text())["groups"]
            if groups is None or group["name"] in groups for rule in group["rules"]}


def panel_queries() -> dict[str, list[str]]:
    """Each panel's queries, with the template variables as a user picking All sees them."""
    substitutions = {"$__rate_interval": RANGE, "$__range": RANGE, "$job": JOB,
                     "$instance": ".*", "$task": ".*", "$queue": ".*"}
    found: dict[str, list[str]] = {}
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        exprs = []
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in substitutions.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, expr
            exprs.append(expr)
        assert panel["title"] not in found, panel["title"]
        found[panel["title"]] = exprs
    return found


@contextmanager
def worker(broker_url: str, queue: str, hostname: str, port: int, log: Path, *,
           pool: str, concurrency: int, extra: tuple[str, ...] = ()) -> Iterator[subprocess.Popen[bytes]]:
    """`celery -A tests.support.prometheus_app worker`, its metrics on 127.0.0.1:port, in a
    process group of its own (ended with it, pool children included)."""
    env = dict(
        os.environ, BROKER_URL=broker_url, PROM_PORT=str(port),
        # Our queue-length thread reads the broker this often (health.export_interval_s).
        OTEL_METRIC_EXPORT_INTERVAL="300",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    args = [sys.executable, "-m", "celery", "-A", "tests.support.prometheus_app", "worker",
            "--pool", pool, "--concurrency", str(concurrency), "-Q", queue, "--hostname", hostname,
            "--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel", "INFO", *extra]
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        yield proc
    finally:
        kill(proc)


def kill(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


def rounded(values: dict[Any, float], scale: float = 1.0) -> dict[Any, float]:
    """Counts read back from extrapolated rates: the nearest integer, checked to be near."""
    found = {}
    for key, value in values.items():
        count = round(value * scale)
        assert abs(value * scale - count) < 0.4, (key, value * scale)
        found[key] = count
    return found


def finite(values: dict[Any, float]) -> dict[Any, float]:
    return {key: value for key, value in values.items() if not math.isnan(value)}


def test_dashboard_and_alerts_against_a_real_prometheus(redis_url, tmp_path, producer_side):
    """Every panel's query and every alert's expression, asked of a real Prometheus that
    scrapes a prefork worker (and two blocked solo workers holding a backlog), gives
    what the workload implies; a worker killed outright is reported gone."""
    ports = {"a": free_port(), "b1": free_port(), "b2": free_port()}
    hosts = {name: f"{name}-{os.getpid()}@localhost" for name in ports}
    work_q, backlog_q = f"work-{os.getpid()}", f"backlog-{os.getpid()}"
    # producer_side: this process publishes instrumented, so messages carry the publish
    # time the worker's queue time is measured from.
    app = Celery("producer", broker=redis_url, backend=redis_url, set_as_current=False)
    app.conf.update(broker_connection_retry_on_startup=True, result_expires=300)
    deadline = 60

    with ExitStack() as stack:
        prom = stack.enter_context(prometheus_server([f"127.0.0.1:{p}" for p in ports.values()]))
        a = stack.enter_context(worker(redis_url, work_q, hosts["a"], ports["a"], tmp_path / "a.log",
                                       pool="prefork", concurrency=2))
        # Solo, prefetching one: each holds the one task it runs, the rest waits in Redis.
        blocked = {name: stack.enter_context(worker(
            redis_url, backlog_q, hosts[name], ports[name], tmp_path / f"{name}.log",
            pool="solo", concurrency=1, extra=("--prefetch-multiplier", "1")))
            for name in ("b1", "b2")}
        for port in ports.values():
            wait_for_port(port, deadline)
        pool = f'celery_worker_pool_size{{job="{JOB}"}}'
        by_host = "celery_worker_hostname"
        try:
            prom.wait(pool, by_host, {hosts["a"]: 2, hosts["b1"]: 1, hosts["b2"]: 1}, deadline)

            def send(name: str, *args: Any, queue: str = work_q, **options: Any) -> Any:
                return app.send_task(name, args, queue=queue, **options)

            # Warm-up: the t.work and t.nap series exist before the workload.
            for result in (send("t.work", False), send("t.work", True), send("t.nap", 0.3)):
                result.get(timeout=deadline, propagate=False)
            counted = f'sum by (celery_task_name, celery_task_state) (messaging_client_consumed_messages_total{{job="{JOB}"}})'
            states = ("celery_task_name", "celery_task_state")
            prom.wait(counted, states, {("t.work", "SUCCESS"): 1, ("t.work", "FAILURE"): 1,
                                        ("t.nap", "SUCCESS"): 1}, deadline)

            # The workload.
            results = [send("t.work", False) for _ in range(5)] + [send("t.work", True)]
            results += [send("t.nap", 0.3) for _ in range(2)]
            results += [send("t.die"), send("t.stuck", time_limit=1)]
            # Each blocked worker takes one 2-minute nap; the rest waits in the broker.
            active = f'celery_worker_tasks_active{{job="{JOB}"}}'
            send("t.nap", 120, queue=backlog_q)
            blocked_active = f'sum(celery_worker_tasks_active{{job="{JOB}", celery_worker_hostname=~"b.*"}})'
            prom.wait(blocked_active, (), {(): 1}, deadline)
            send("t.nap", 120, queue=backlog_q)
            for _ in range(BACKLOG):
                send("t.work", False, queue=backlog_q)
            for result in results:
                result.get(timeout=deadline, propagate=False)
            prom.wait(counted, states, {
                ("t.work", "SUCCESS"): 6, ("t.work", "FAILURE"): 2, ("t.nap", "SUCCESS"): 3,
                ("t.die", "FAILURE"): 1, ("t.stuck", "FAILURE"): 1}, deadline)
            # Settled: the pool replaced its two killed children, the blocked workers each run one.
            prom.wait(pool, by_host, {hosts["a"]: 2, hosts["b1"]: 1, hosts["b2"]: 1}, deadline)
            prom.wait(active, by_host, {hosts["a"]: 0, hosts["b1"]: 1, hosts["b2"]: 1}, deadline)
            length = f'celery_queue_length{{job="{JOB}", messaging_destination_name="{backlog_q}"}}'
            prom.wait(length, by_host, {hosts["b1"]: BACKLOG, hosts["b2"]: BACKLOG}, deadline)
            _wait_samples(prom, deadline)
            # One evaluation time for every query: worker A's last scrape, so the
            # windows end on a sample of A's series.
            (at,) = prom.values(f'timestamp(up{{instance="127.0.0.1:{ports["a"]}"}})', ()).values()

            check_names(prom, at)
            check_panels(prom, at, hosts, work_q, backlog_q)
            check_alerts(prom, at, work_q, backlog_q)

            # A worker killed outright (no warm shutdown): gone, for the panel and the alert.
            kill(blocked["b2"])
            prom.wait(f'up{{instance="127.0.0.1:{ports["b2"]}"}}', (), {(): 0}, deadline)
            gone = {(JOB, hosts["b2"]): 1.0}
            assert prom.values(panel_queries()["Workers that stopped reporting"][0],
                               ("job", by_host)) == gone
            assert set(prom.values(alerts()["CeleryWorkerGone"], ("job", by_host))) == set(gone)
            # The queue is still counted once, by the worker left.
            assert prom.values(panel_queries()["Queue length by queue"][0],
                               "messaging_destination_name")[backlog_q] == BACKLOG
        except BaseException:
            for name in ports:
                sys.stderr.write(f"--- worker {name} log tail\n{(tmp_path / f'{name}.log').read_text()[-3000:]}\n")
            sys.stderr.write(f"--- prometheus log tail\n{prom.log.read_text()[-3000:]}\n")
            raise
        assert a.poll() is None


def _wait_samples(prom: Prometheus, timeout: float) -> None:
    """Until the warmed-up series have 20 samples: then ``rate() * RANGE_S`` is within
    0.4 of the count (the extrapolation adds at most 1.6 scrape intervals to a series'
    life, and the count since the warm-up is at most 5)."""
    deadline = time.monotonic() + timeout
    expr = (f'min(count_over_time(messaging_client_consumed_messages_total'
            f'{{job="{JOB}", celery_task_name=~"t.work|t.nap"}}[{RANGE}]))')
    while prom.values(expr, ()).get((), 0) < 20:
        assert time.monotonic() < deadline, "too few scrapes"
        time.sleep(0.2)


def check_panels(prom: Prometheus, at: float, hosts: dict[str, str], work_q: str, backlog_q: str) -> None:
    queries = panel_queries()
    task, state, error = "celery_task_name", "celery_task_state", "error_type"
    checked: set[str] = set()

    def ask(title: str, by: Any, index: int = 0) -> dict[Any, float]:
        checked.add(title)
        return prom.values(queries[title][index], by, at)

    # Rates count from a series' first sample: t.die and t.stuck appeared in the workload.
    assert rounded(ask("Task throughput by task", task), RANGE_S) == {
        "t.work": 6, "t.nap": 2, "t.die": 0, "t.stuck": 0}
    assert rounded(ask("Task failures by task and error", (task, error)), RANGE_S) == {
        ("t.work", "ValueError"): 1, ("t.die", LOST): 0, ("t.stuck", TIME_LIMIT): 0}
    # Counts over the range include first occurrences: exact.
    assert ask("Deliveries in range by task and state", (task, state)) == {
        ("t.work", "SUCCESS"): 6, ("t.work", "FAILURE"): 2, ("t.nap", "SUCCESS"): 3,
        ("t.die", "FAILURE"): 1, ("t.stuck", "FAILURE"): 1}
    assert ask("Failure ratio by task in range", task) == {
        "t.work": 0.25, "t.nap": 0.0, "t.die": 1.0, "t.stuck": 1.0}
    for index in range(3):  # p50, p95, p99
        durations = finite(ask("Process duration by task", task, index))
        assert set(durations) == {"t.work", "t.nap"}
        # A 0.3 s nap lies above the 0.25 bound, so every quantile of them does; the
        # upper bounds leave room for a loaded machine (0.38 s seen for t.work).
        assert 0.25 < durations["t.nap"] <= 1
        assert durations["t.work"] <= 1
        waits = finite(ask("Queue time by queue", "messaging_destination_name", index))
        assert set(waits) == {work_q}
        assert 0 < waits[work_q] <= 5
    assert ask("Queue length by queue", "messaging_destination_name") == {work_q: 0, backlog_q: BACKLOG}
    assert prom.values(f'count(celery_queue_length{{messaging_destination_name="{backlog_q}"}})', (), at) == {(): 2}
    host = "celery_worker_hostname"
    expected = [{hosts["a"]: 0, hosts["b1"]: 1, hosts["b2"]: 1},  # active
                {hosts["a"]: 0, hosts["b1"]: 0, hosts["b2"]: 0},  # reserved
                {hosts["a"]: 2, hosts["b1"]: 1, hosts["b2"]: 1}]  # pool
    for index, values in enumerate(expected):
        assert ask("Tasks per worker", host, index) == values
    assert ask("Lost pool children and hard time limits in range", (task, error)) == {
        ("t.die", LOST): 1, ("t.stuck", TIME_LIMIT): 1}
    assert ask("Workers that stopped reporting", ("job", host)) == {}
    assert checked == set(queries), "a panel without a check"


def check_names(prom: Prometheus, at: float) -> None:
    """The series names and labels docs/dashboards.md lists, as the worker exports them."""
    ours = f'{{job="{JOB}", __name__=~"messaging_.+|celery_.+"}}'
    histograms = [f"{name}_seconds_{part}" for name in ("messaging_process_duration", "celery_message_queue_time")
                  for part in ("bucket", "sum", "count")]
    assert set(prom.values(f"count by (__name__) ({ours})", "__name__", at)) == {
        "messaging_client_consumed_messages_total", *histograms, "celery_worker_tasks_active",
        "celery_worker_tasks_reserved", "celery_worker_pool_size", "celery_queue_length"}
    delivery = {"celery_task_name", "messaging_destination_name", "messaging_operation_name", "messaging_system"}
    for row in prom.query(f'{{job="{JOB}", __name__=~"messaging_.+"}}', at):
        labels = set(row["metric"])
        assert delivery <= labels, row
        if row["metric"]["__name__"].startswith("messaging_client_consumed"):
            assert "celery_task_state" in labels, row
            assert ("error_type" in labels) == (row["metric"]["celery_task_state"] == "FAILURE"), row
    for row in prom.query(f'{{job="{JOB}", __name__=~"celery_worker_.+|celery_queue_length"}}', at):
        assert "celery_worker_hostname" in row["metric"], row


def check_alerts(prom: Prometheus, at: float, work_q: str, backlog_q: str) -> None:
    # The groups this workload exercises (a group of beat alerts, say, needs its own).
    rules = alerts(("celery-tasks", "celery-queues", "celery-workers"))
    checked: set[str] = set()

    def firing(name: str, by: tuple[str, ...]) -> set[Any]:
        checked.add(name)
        return set(prom.values(rules[name], by, at))

    task, queue = ("job", "celery_task_name"), ("job", "messaging_destination_name")
    # t.work: 1 of the 6 deliveries since the warm-up failed; the series of t.die and
    # t.stuck appeared at 1 and stayed there: a rate of 0 over 0, no ratio.
    assert firing("CeleryTaskFailureRatioHigh", task) == {(JOB, "t.work")}
    assert firing("CeleryPoolChildLost", task) == {(JOB, "t.die")}
    assert firing("CeleryTaskHardTimeLimit", task) == {(JOB, "t.stuck")}
    assert firing("CeleryQueueBacklog", queue) == {(JOB, backlog_q)}
    # Nothing waited a minute; without the threshold, the quantile is there for the queue.
    assert firing("CeleryQueueTimeHigh", queue) == set()
    quantile = rules["CeleryQueueTimeHigh"].rsplit(">", 1)[0]
    assert set(finite(prom.values(quantile, queue, at))) == {(JOB, work_q)}
    assert firing("CeleryWorkerGone", ("job", "celery_worker_hostname")) == set()
    assert checked == set(rules), "an alert without a check"
