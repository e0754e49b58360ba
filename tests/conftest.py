"""Shared fixtures: real brokers, an SDK wired to in-memory exporters, real workers."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import hypothesis  # noqa: F401 - see below
import pytest
from celery import Celery
from celery.backends import redis as _redis_backend
from celery.result import AsyncResult
from celery.contrib.testing.worker import start_worker
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from otel_celery_headers import CeleryHeadersInstrumentor
from tests.support import servers
from tests.support.tasks import register

# hypothesis is imported here, at collection, rather than by its pytest plugin at the
# end of the run: CPython 3.11.7 can fail that late ast.parse with "AST constructor
# recursion depth mismatch" (python/cpython#106905) after the RabbitMQ tests.

# Celery before the fix of celery/celery#10477 (redis result backend): the cyclic GC
# can run AsyncResult.__del__ in the middle of a pub/sub command on the same thread,
# which then UNSUBSCRIBEs on the same connection and deadlocks (seen here on Celery
# 5.3 in a result.get()). In this test process only, on such versions, dropped results
# leave their subscription alone: the tests never reuse a result after dropping it.
if not hasattr(_redis_backend.ResultConsumer, "_flush_pending_unsubscribe"):
    AsyncResult.__del__ = lambda self: None  # type: ignore[method-assign]

# One SDK for the whole session: the global provider can be set only once. Spans are
# exported synchronously, so a span is visible the moment it ends.
EXPORTER = InMemorySpanExporter()
PROVIDER = TracerProvider()
PROVIDER.add_span_processor(SimpleSpanProcessor(EXPORTER))
trace.set_tracer_provider(PROVIDER)
METRICS = InMemoryMetricReader()
METER_PROVIDER = MeterProvider(metric_readers=[METRICS])


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with servers.redis_server() as (url, _proc):
        yield url


@pytest.fixture(scope="session")
def rabbitmq_url() -> Iterator[str]:
    with servers.rabbitmq_server() as url:
        yield url


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    EXPORTER.clear()
    yield EXPORTER
    EXPORTER.clear()


@pytest.fixture
def tracer() -> trace.Tracer:
    return PROVIDER.get_tracer("tests")


def make_app(broker: str, backend: str | None = None, **conf: Any) -> tuple[Celery, SimpleNamespace]:
    app = Celery(f"test-{time.monotonic_ns()}", broker=broker, backend=backend or broker, set_as_current=False)
    app.conf.update(
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        result_expires=300,
        # AsyncResult.__del__ may talk to the backend after a test's Redis is gone:
        # fail fast instead of Celery 5.3's minutes of reconnect retries.
        result_backend_transport_options={
            "retry_policy": {"max_retries": 1, "interval_start": 0, "interval_step": 0.1,
                             "interval_max": 0.2},
        },
        **conf,
    )
    return app, register(app)


def instrument(**kwargs: Any) -> CeleryHeadersInstrumentor:
    kwargs.setdefault("tracer_provider", PROVIDER)
    kwargs.setdefault("meter_provider", METER_PROVIDER)
    instrumentor = CeleryHeadersInstrumentor()
    instrumentor.instrument(**kwargs)
    return instrumentor


@pytest.fixture
def instrumented() -> Iterator[CeleryHeadersInstrumentor]:
    instrumentor = instrument()
    yield instrumentor
    instrumentor.uninstrument()


@pytest.fixture
def producer_side(instrumented: CeleryHeadersInstrumentor) -> CeleryHeadersInstrumentor:
    """This process instrumented as the publishing side of a worker subprocess."""
    return instrumented


def worker(app: Celery, pool: str = "solo", **kwargs: Any) -> Any:
    return start_worker(
        app, pool=pool, concurrency=4 if pool == "threads" else 1,
        # Celery 5.3's event loop notices a stop only after its next poll, which can
        # wait up to 10 s for a timer: give the worker thread time to leave.
        perform_ping_check=False, shutdown_timeout=60, loglevel="WARNING", **kwargs,
    )


def wait_for(
    predicate: Callable[[list[ReadableSpan]], Any], timeout: float = 15.0
) -> Any:
    """Poll the exporter until ``predicate(spans)`` is truthy; return its value."""
    deadline = time.monotonic() + timeout
    while True:
        spans = list(EXPORTER.get_finished_spans())
        result = predicate(spans)
        if result:
            return result
        if time.monotonic() > deadline:
            names = sorted(s.name for s in spans)
            raise AssertionError(f"timed out waiting for spans; have {names}")
        time.sleep(0.02)
