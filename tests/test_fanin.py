"""Chord fan-in bookkeeping (fanin.py) against real Celery objects, without a worker.

The end-to-end behaviour (the body span linking to each header) is in test_paths.py
and test_prefork.py; here: which requests count as chord headers, which messages count
as the body, that a result backend that fails costs the chord nothing, and, end to
end on a worker, the Sentinel result backend.
"""

from __future__ import annotations

import socket
import time
from types import SimpleNamespace

import pytest
import redis
from celery import Celery, chain, chord, group
from opentelemetry.trace import SpanContext, SpanKind, TraceFlags

from otel_celery_headers import fanin
from tests.conftest import instrument, make_app, wait_for, worker
from tests.support.reliability import capture_our_logger
from tests.support.servers import redis_sentinel
from tests.support.spans import by_message, trace_id

CONTEXT = SpanContext(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, False,
                      TraceFlags(TraceFlags.SAMPLED))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def app_with(backend: str) -> Celery:
    app = Celery("fanin", broker="memory://", backend=backend, set_as_current=False)

    @app.task(name="t.add", shared=False)
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="t.collect", shared=False)
    def collect(values: list[int]) -> int:
        return sum(values)

    return app


def header_request(app: Celery, body) -> SimpleNamespace:
    """task.request of a chord header, as the worker builds it: body as a plain dict."""
    sig = chord([app.tasks["t.add"].s(1, 1), app.tasks["t.add"].s(2, 2)], body)
    sig.freeze()
    return SimpleNamespace(chord=dict(sig.body), group="g-1", group_index=0)


def redis_backend(url: str = "redis://127.0.0.1:1/0"):
    """A real RedisBackend; nothing connects until a command is sent."""
    return app_with(url).backend


def test_body_ids_for_task_chain_and_group_bodies():
    """The ids a finishing header publishes the body under, for each body shape."""
    app = app_with("cache+memory://")  # builds the canvas without a server
    add, collect = app.tasks["t.add"], app.tasks["t.collect"]
    backend = redis_backend()

    plain = collect.s()
    part = fanin.part_of(header_request(app, plain), backend)
    assert part is not None and part.group_id == "g-1"
    assert part.body_ids == {plain.id}

    steps = chain(collect.s(), add.s(1))
    part = fanin.part_of(header_request(app, steps), backend)
    first = part.body_ids - {steps.id}
    assert len(first) == 1 and first != {steps.tasks[1].id}

    both = group(collect.s(), collect.s())
    part = fanin.part_of(header_request(app, both), backend)
    assert {both.id, *(t.id for t in both.tasks)} <= part.body_ids


def test_not_a_chord_header_or_not_a_redis_backend():
    """A plain task, or a result backend other than Redis: nothing to do, nothing written."""
    backend = redis_backend()
    assert fanin.part_of(SimpleNamespace(chord=None, group="g"), backend) is None
    assert fanin.part_of(SimpleNamespace(chord={"task": "t.collect"}, group=None), backend) is None
    for url in ("rpc://", "cache+memory://"):
        other = app_with(url)
        assert fanin.part_of(header_request(other, other.tasks["t.collect"].s()), other.backend) is None


@pytest.fixture
def unpaused(monkeypatch):
    monkeypatch.setattr(fanin, "_paused_until", 0.0)


def part_on(url: str) -> fanin.ChordPart:
    request = SimpleNamespace(chord={"task": "t.collect", "options": {"task_id": "b"}}, group="g")
    part = fanin.part_of(request, redis_backend(url))
    assert part is not None
    return part


def test_refused_connection_is_reported_once_then_fan_in_pauses(unpaused):
    """Redis down: the header's write fails inside us, logged once, never raised; then no more tries for a while."""
    part = part_on(f"redis://127.0.0.1:{free_port()}/0")
    with capture_our_logger() as logged:
        fanin.remember(part, CONTEXT)
        started = time.monotonic()
        for _ in range(100):
            fanin.remember(part, CONTEXT)
            assert fanin.collect(part_on(f"redis://127.0.0.1:{free_port()}/0")) is None
        assert time.monotonic() - started < 0.5  # paused: no connection attempts
    assert [r.getMessage().split(" ignored")[0] for r in logged] == [
        "otel-celery-headers: error in chord header store"]


def test_redis_that_never_answers_costs_one_short_timeout(unpaused):
    """A server that accepts and never replies (a hung Redis): the task waits TIMEOUT_S once, not 120 s."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        part = part_on(f"redis://127.0.0.1:{silent.getsockname()[1]}/0")
        with capture_our_logger() as logged:
            started = time.monotonic()
            fanin.remember(part, CONTEXT)
            first = time.monotonic() - started
            assert fanin.collect(part) is None
            total = time.monotonic() - started
    assert fanin.TIMEOUT_S <= first < fanin.TIMEOUT_S + 2
    assert total - first < 0.1  # the read came during the pause
    assert len(logged) == 1


def test_links_parse_strictly_and_stop_at_the_limit():
    ref = "0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331"
    assert [link.context.span_id for link in fanin.links_from(f"{ref} junk 0x{ref[2:]}")] == [
        0xB7AD6B7169203331]
    many = " ".join(f"{i + 1:032x}-{i + 1:016x}" for i in range(300))
    links = fanin.links_from(many)
    assert len(links) == fanin.MAX_LINKS and links[-1].context.span_id == fanin.MAX_LINKS
    assert all(link.attributes == {"celery.link": "chord_header"} for link in links)


def test_chord_links_through_a_sentinel_backend(redis_url, exporter, tracer):
    """Result backend behind a real Sentinel: the body's span links to every header span, and the list is in the master."""
    with redis_sentinel() as (sentinel_url, master_name, master_url):
        app, t = make_app(redis_url, backend=f"{sentinel_url}/0", task_default_queue="fanin-sentinel")
        app.conf.result_backend_transport_options = {
            **app.conf.result_backend_transport_options, "master_name": master_name}
        assert type(app.backend).__name__ == "SentinelBackend"
        instrumentor = instrument()
        try:
            with worker(app):
                with tracer.start_as_current_span("request") as root:
                    result = chord([t.add.s(i, i) for i in range(4)], t.collect.s()).apply_async()
                assert result.get(timeout=30) == 12

                def body_and_headers(spans):
                    bodies = by_message(spans, result.id, SpanKind.CONSUMER)
                    headers = [s for s in spans if s.kind == SpanKind.CONSUMER and s.name == "process t.add"
                               and trace_id(s) == trace_id(root)]
                    return (bodies[0], headers) if len(bodies) == 1 and len(headers) == 4 else None

                body, headers = wait_for(body_and_headers, timeout=30)
        finally:
            instrumentor.uninstrument()
        assert {(link.context.trace_id, link.context.span_id) for link in body.links} == {
            (s.context.trace_id, s.context.span_id) for s in headers}
        assert [(link.attributes or {}).get("celery.link") for link in body.links] == ["chord_header"] * 4
        # Written through the Sentinel's master: the key is there, one entry per header.
        master = redis.Redis.from_url(master_url)
        try:
            keys = master.keys(f"*{result.parent.id}*.otel")
            assert len(keys) == 1 and master.llen(keys[0]) == 4
            assert 0 < master.ttl(keys[0]) <= 300
        finally:
            master.close()
