"""The tasks the tests publish, registered on whichever app a test builds."""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any

from celery import Celery
from celery.exceptions import Ignore, Reject
from opentelemetry import baggage, trace

body_tracer = trace.get_tracer("tests.task-body")


def register(app: Celery) -> SimpleNamespace:
    # shared=False: Celery otherwise adds every @app.task to all apps created later,
    # and each test builds its own app.
    task = functools.partial(app.task, shared=False)

    @task(name="t.add")
    def add(x: int, y: int) -> int:
        # A span the task body creates itself, like a SQL or HTTP client span would.
        with body_tracer.start_as_current_span("add-body"):
            return x + y

    @task(name="beat.tick")  # what tests/support/beat_app.py's entries send
    def beat_tick(entry: str) -> str:
        return entry

    @task(name="t.fail")
    def fail() -> None:
        raise ValueError("boom")

    @task(name="t.expected", throws=(KeyError,))
    def expected() -> None:
        raise KeyError("expected")

    @task(name="t.retry_once", bind=True, max_retries=3)
    def retry_once(self: Any) -> int:
        if self.request.retries < 1:
            raise self.retry(countdown=0)
        return int(self.request.retries)

    @task(name="t.retry_with_reason", bind=True, max_retries=3)
    def retry_with_reason(self: Any) -> int:
        if self.request.retries < 1:
            raise self.retry(exc=RuntimeError("rate limited"), countdown=0)
        return int(self.request.retries)

    @task(
        name="t.autoretry", bind=True, autoretry_for=(ValueError,), max_retries=1,
        default_retry_delay=0,
    )
    def autoretry(self: Any) -> int:
        if self.request.retries < 1:
            raise ValueError("first attempt fails")
        return int(self.request.retries)

    @task(name="t.replace_me", bind=True)
    def replace_me(self: Any) -> Any:
        raise self.replace(add.s(20, 22))

    @task(name="t.publish_child")
    def publish_child() -> str:
        return str(add.delay(2, 3).id)

    @task(name="t.send_by_name", bind=True)
    def send_by_name(self: Any) -> str:
        """send_task is never eager: from an eager task it is a real publish."""
        return str(self.app.send_task("t.add", args=(1, 1)).id)

    @task(name="t.ignore_me")
    def ignore_me() -> None:
        raise Ignore()

    @task(name="t.reject_me")
    def reject_me() -> None:
        raise Reject("no", requeue=False)

    @task(name="t.reject_requeue_once", bind=True, acks_late=True)
    def reject_requeue_once(self: Any) -> int:
        """Reject(requeue=True) on the first delivery of this task id (a Redis INCR in
        the result backend); returns the delivery's number on the next."""
        key = f"test-reject-requeue:{self.request.id}"
        client = self.backend.client
        delivery = int(client.incr(key))
        client.expire(key, 600)
        if delivery == 1:
            raise Reject("again", requeue=True)
        return delivery

    @task(name="t.whoami")
    def whoami() -> dict[str, Any]:
        """What the task body sees as its current context."""
        ctx = trace.get_current_span().get_span_context()
        return {
            "trace_id": format(ctx.trace_id, "032x"),
            "span_id": format(ctx.span_id, "016x"),
            "baggage": dict(baggage.get_all()),
        }

    @task(name="t.header", bind=True)
    def header(self: Any, key: str) -> Any:
        """A header as the task sees it: top level, or among the custom headers."""
        value = getattr(self.request, key, None)
        if value is None and isinstance(self.request.headers, dict):
            value = self.request.headers.get(key)
        return value

    @task(name="t.on_error")
    def on_error(task_id: str) -> str:
        """An error callback of arity one: Celery publishes it (wider ones run inline)."""
        return task_id

    @task(name="t.sleep")
    def sleep(seconds: float) -> float:
        import time

        time.sleep(seconds)
        return seconds

    @task(name="t.die")
    def die() -> None:
        """The pool child vanishes mid-task, as with an OOM kill."""
        import os

        os._exit(3)

    @task(name="t.finish_then_die", ignore_result=True)
    def finish_then_die() -> str:
        """Returns; worker_app's task_postrun receiver then kills the pool child before
        the main process reads the result (ignore_result: Celery 5.7 does not look
        for a stored SUCCESS, so every version reports WorkerLostError)."""
        return "done"

    @task(name="t.log_line")
    def log_line(text: str) -> str:
        """One line through Celery's task logger."""
        from celery.utils.log import get_task_logger

        get_task_logger("tests.tasks").warning("task says %s", text)
        return text

    @task(name="t.redis_set")
    def redis_set(key: str) -> str:
        """One Redis command of the task body's own (SET), on the broker's server."""
        import os

        import redis

        redis.Redis.from_url(os.environ["BROKER_URL"]).set(key, "1")
        return key

    @task(name="t.collect")
    def collect(values: list[int]) -> int:
        return sum(values)

    def dies_twice(self: Any) -> int:
        """The pool child vanishes on the first two deliveries of this task id; the
        third succeeds. The count is a Redis INCR in the result backend."""
        import os

        key = f"test-die-twice:{self.request.id}"
        client = self.backend.client
        delivery = int(client.incr(key))
        client.expire(key, 600)
        if delivery <= 2:
            os._exit(1)
        return delivery

    @task(name="t.hold_once", bind=True, acks_late=True)
    def hold_once(self: Any, seconds: float) -> int:
        """Sleeps ``seconds`` on the first delivery of this task id (a Redis INCR in the
        result backend), returns at once on a later one: a worker killed during the
        first leaves the message unacknowledged, and the next worker finishes it."""
        import time

        key = f"test-hold-once:{self.request.id}"
        client = self.backend.client
        delivery = int(client.incr(key))
        client.expire(key, 600)
        if delivery == 1:
            time.sleep(seconds)
        return delivery

    # acks_late + reject_on_worker_lost: Celery requeues the lost message.
    die_twice = task(name="t.die_twice", bind=True, acks_late=True, reject_on_worker_lost=True)(dies_twice)
    # Celery 5.7 retry_on_worker_lost: the main process publishes a retry (5.3 ignores it).
    die_twice_retry = task(
        name="t.die_twice_retry", bind=True, retry_on_worker_lost=True, default_retry_delay=0,
    )(dies_twice)

    return SimpleNamespace(
        add=add, fail=fail, expected=expected, retry_once=retry_once, retry_with_reason=retry_with_reason,
        autoretry=autoretry,
        replace_me=replace_me, publish_child=publish_child, send_by_name=send_by_name, ignore_me=ignore_me,
        reject_me=reject_me, whoami=whoami, header=header, on_error=on_error, die=die, sleep=sleep, collect=collect, log_line=log_line, redis_set=redis_set,
        finish_then_die=finish_then_die,
        die_twice=die_twice, die_twice_retry=die_twice_retry, hold_once=hold_once,
        reject_requeue_once=reject_requeue_once,
    )
