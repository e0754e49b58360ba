"""Chord fan-in bookkeeping (fanin.py) against real Celery objects, without a worker.

The end-to-end behaviour (the body span linking to each header) is in test_paths.py
and test_prefork.py; here: which requests count as chord headers, which messages count
as the body, and that a result backend that fails costs the chord nothing.
"""

from __future__ import annotations

import socket
from types import SimpleNamespace

from celery import Celery, chain, chord, group
from opentelemetry.trace import SpanContext, TraceFlags

from otel_celery_headers import fanin
from tests.support.reliability import capture_our_logger

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


def test_body_ids_for_task_chain_and_group_bodies():
    """The ids a finishing header publishes the body under, for each body shape."""
    app = app_with("cache+memory://")
    add, collect = app.tasks["t.add"], app.tasks["t.collect"]

    plain = collect.s()
    part = fanin.part_of(header_request(app, plain), app.backend)
    assert part is not None and part.group_id == "g-1"
    assert part.body_ids == {plain.id}

    steps = chain(collect.s(), add.s(1))
    part = fanin.part_of(header_request(app, steps), app.backend)
    first = part.body_ids - {steps.id}
    assert len(first) == 1 and first != {steps.tasks[1].id}

    both = group(collect.s(), collect.s())
    part = fanin.part_of(header_request(app, both), app.backend)
    assert {both.id, *(t.id for t in both.tasks)} <= part.body_ids


def test_not_a_chord_header_or_no_key_value_backend():
    """A plain task, or a backend without key-value access (rpc): nothing to do, nothing written."""
    cache = app_with("cache+memory://")
    assert fanin.part_of(SimpleNamespace(chord=None, group="g"), cache.backend) is None
    assert fanin.part_of(SimpleNamespace(chord={"task": "t.collect"}, group=None), cache.backend) is None
    rpc = app_with("rpc://")
    assert fanin.part_of(header_request(rpc, rpc.tasks["t.collect"].s()), rpc.backend) is None


def test_unreachable_backend_is_reported_once_and_swallowed():
    """Redis down: the header's write and the body's read fail inside us, logged once each, never raised."""
    app = app_with(f"redis://127.0.0.1:{free_port()}/0")
    app.conf.redis_socket_connect_timeout = 0.5
    request = SimpleNamespace(chord={"task": "t.collect", "options": {"task_id": "b"}}, group="g")
    part = fanin.part_of(request, app.backend)
    assert part is not None
    with capture_our_logger() as logged:
        for _ in range(3):
            fanin.remember(part, 0, CONTEXT)
            assert fanin.collect(part) is None
    assert [r.getMessage().split(" ignored")[0] for r in logged] == [
        "otel-celery-headers: error in chord header store",
        "otel-celery-headers: error in chord header read",
    ]


def test_links_parse_strictly_and_stop_at_the_limit():
    ref = "0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331"
    assert [link.context.span_id for link in fanin.links_from(f"{ref} junk 0x{ref[2:]}")] == [
        0xB7AD6B7169203331]
    many = " ".join(f"{i + 1:032x}-{i + 1:016x}" for i in range(300))
    links = fanin.links_from(many)
    assert len(links) == fanin.MAX_LINKS and links[-1].context.span_id == fanin.MAX_LINKS
    assert all(link.attributes == {"celery.link": "chord_header"} for link in links)
