"""App module for `celery -A tests.support.quiet_app worker`: worker_app's tasks and
tracing, with opentelemetry-instrumentation-redis active (what `opentelemetry-bootstrap
-a install` sets up beside us) so every Redis command the worker sends could be a span."""

from __future__ import annotations

import os

from opentelemetry.instrumentation.redis import RedisInstrumentor

from tests.support.worker_app import app, tasks  # noqa: F401 - the worker's app and tasks

RedisInstrumentor().instrument()

if os.environ.get("CHILD_INIT_REDIS"):
    # tests/test_quiet.py: user code in each pool child, outside any task.
    from celery import signals

    @signals.worker_process_init.connect(weak=False)
    def _child_init_redis_call(**_: object) -> None:
        import redis

        redis.Redis.from_url(os.environ["BROKER_URL"]).set(f"child-init-{os.getpid()}", "1")
