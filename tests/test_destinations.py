"""``messaging.destination.name`` is the queue a message is routed to (issue 18, item 1).

Never a routing key made per message: RabbitMQ native delayed delivery (Celery 5.5+,
quorum queues) sends a countdown to ``celery_delayed_27`` under a key prefixed by 28
delay words; topic keys differ from the queue they reach. Real brokers, an in-process
worker consuming every queue of the app; spans and metric points of both sides.
"""

from __future__ import annotations

import importlib.util
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kombu import Connection, Exchange, Queue
from opentelemetry.trace import SpanKind

from otel_celery_headers.destinations import resolve, topic_matches, undelayed
from otel_celery_headers.queue_length import QueueLengths
from tests.conftest import METRICS, make_app, wait_for, worker
from tests.support.spans import attr, one

P, C = SpanKind.PRODUCER, SpanKind.CONSUMER
DEST = "messaging.destination.name"
SCOPE = "otel_celery_headers"
# Celery 5.5 brought native delayed delivery, and the worker's handling of quorum
# queues (no global QoS) that a quorum queue needs at all.
NATIVE_DELAYED = importlib.util.find_spec("celery.worker.consumer.delayed_delivery") is not None
DELAY_KEY = "0." * 26 + "1.0.work"  # kombu's calculate_routing_key(2, "work")


def test_delay_words_are_dropped_and_nothing_else():
    """The 28 binary words of calculate_routing_key go; a key that only looks a bit like them stays."""
    assert undelayed(DELAY_KEY) == "work"
    assert undelayed("0." * 28 + "a.b") == "a.b"
    assert undelayed("work") is None
    assert undelayed("0." * 27 + "2.work") is None
    assert undelayed("0." * 28) is None  # nothing after the delay: not a delayed key


def test_topic_matching_follows_amqp():
    assert topic_matches("work.#", "work") and topic_matches("work.#", "work.a.b")
    assert topic_matches("*.high", "work.high") and not topic_matches("*.high", "a.work.high")
    assert topic_matches("#.work.#", "x.work") and topic_matches("#", "")
    assert not topic_matches("work.*", "work") and not topic_matches("work", "work.a")


def test_resolve_names_one_queue_else_the_exchange():
    """One matching queue: its name; several (a fanout to two) or none: the exchange;
    a delayed key: the queue whose #.<key> binding matches, on any non-direct exchange."""
    topic, fan, direct = Exchange("tasks", "topic"), Exchange("fan", "fanout"), Exchange("d", "direct")
    queues = {q.name: q for q in (
        Queue("work", topic, routing_key="work.#"), Queue("audit", topic, routing_key="*.audit"),
        Queue("f1", fan, routing_key="f1"), Queue("f2", fan, routing_key="f2"),
        Queue("plain", direct, routing_key="plain"),
    )}
    assert resolve(queues, "tasks", "work.high") == "work"
    assert resolve(queues, "tasks", "x.audit") == "audit"
    assert resolve(queues, "tasks", "work.audit") == "tasks"  # both topic queues
    assert resolve(queues, "fan", "anything") == "fan"
    assert resolve(queues, "d", "plain") == "plain"
    assert resolve(queues, "d", "other") == "d"
    assert resolve(queues, None, "work.high") == "work"
    assert resolve(queues, None, "f2") == "f2"
    assert resolve(queues, None, "plain") == "plain"  # direct: not delayed, no match: the key


def test_a_worker_resolves_among_the_queues_it_consumes_and_caches_per_key():
    """A topic key two queues match, one consumed here: the consumed one; the publisher
    (every queue) names the exchange. A Broadcast queue is named by its alias. The
    cache follows the queue table: a queue added later is found."""
    from types import SimpleNamespace

    from kombu.common import Broadcast

    from otel_celery_headers.destinations import Resolver

    topic = Exchange("tasks", "topic")
    work, audit = Queue("work", topic, routing_key="work.#"), Queue("audit", topic, routing_key="#")
    bcast = Broadcast("news")
    table: Any = type("Queues", (dict,), {})({q.name: q for q in (work, audit, bcast)})
    table.consume_from = {"work": work, bcast.name: bcast}
    app = SimpleNamespace(amqp=SimpleNamespace(queues=table))
    consuming, publishing = Resolver(consuming=True), Resolver(consuming=False)
    assert consuming.name(app, "tasks", "work.high") == "work"
    assert publishing.name(app, "tasks", "work.high") == "tasks"
    assert consuming.name(app, Exchange("news", "fanout"), "") == "news"
    assert publishing.name(app, "", "anything") == "anything"  # the default exchange
    assert publishing.name(app, "tasks", "x.y") == "audit"
    table["xy"] = Queue("xy", topic, routing_key="x.y")
    assert publishing.name(app, "tasks", "x.y") == "tasks"  # audit and xy now


def destinations_seen(token: str) -> dict[str, set[str]]:
    """Metric name -> every messaging.destination.name containing ``token``, this process."""
    data = METRICS.get_metrics_data()
    found: dict[str, set[str]] = {}
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            if sm.scope.name != SCOPE:
                continue
            for metric in sm.metrics:
                for point in metric.data.data_points:
                    name = (point.attributes or {}).get(DEST)
                    if isinstance(name, str) and token in name:
                        found.setdefault(metric.name, set()).add(name)
    return found


def queue_time_max(queue: str) -> float:
    data = METRICS.get_metrics_data()
    return max(
        point.max
        for rm in data.resource_metrics for sm in rm.scope_metrics if sm.scope.name == SCOPE
        for metric in sm.metrics if metric.name == "celery.message.queue_time"
        for point in metric.data.data_points if (point.attributes or {}).get(DEST) == queue
    )


def sent_and_processed(task_id: str, exporter: Any) -> tuple[Any, Any]:
    consumer = wait_for(lambda spans: one(spans, task_id, C))
    return one(exporter.get_finished_spans(), task_id, P), consumer


@pytest.fixture
def quorum(rabbitmq_url: str, redis_url: str) -> Iterator[Any]:
    if not NATIVE_DELAYED:
        pytest.skip("Celery < 5.5: no native delayed delivery, no quorum queue support in the worker")
    token = uuid.uuid4().hex[:8]
    topic = Exchange(f"tasks-{token}", type="topic")
    fan = Exchange(f"fan-{token}", type="fanout")
    qq = {"x-queue-type": "quorum"}
    work = Queue(f"work-{token}", topic, routing_key=f"work-{token}.#", queue_arguments=qq)
    fq = Queue(f"fq-{token}", fan, routing_key=f"fq-{token}", queue_arguments=qq)
    app, t = make_app(rabbitmq_url, backend=redis_url, task_queues=[work, fq],
                      task_default_queue=work.name)
    yield token, app, t


def test_native_delayed_delivery_is_destined_to_its_queue(quorum, exporter, tracer, producer_side):
    """Quorum queues on a topic and a fanout exchange, countdowns (native delayed
    delivery), a topic routing key of the task's own: every span and metric point names
    work-<t> or fq-<t>, never a routing key; time in queue is counted from the eta."""
    token, app, t = quorum
    work, fq = f"work-{token}", f"fq-{token}"
    with worker(app):
        with tracer.start_as_current_span("request"):
            delayed = t.add.apply_async((1, 2), countdown=2)
            fanned = t.add.apply_async((2, 2), queue=fq, countdown=1)
            fanned_now = t.add.apply_async((3, 2), queue=fq)
            keyed = t.add.apply_async((4, 2), exchange=f"tasks-{token}", routing_key=f"work-{token}.high")
        assert [r.get(timeout=30) for r in (delayed, fanned, fanned_now, keyed)] == [3, 4, 5, 6]
        for result, queue in ((delayed, work), (fanned, fq), (fanned_now, fq), (keyed, work)):
            send, process = sent_and_processed(result.id, exporter)
            assert (attr(send, DEST), attr(process, DEST)) == (queue, queue)
    send, process = sent_and_processed(delayed.id, exporter)
    # Through RabbitMQ's delay levels: it ran after its countdown, and waited ~0 since.
    assert (process.start_time - send.start_time) / 1e9 >= 1.9
    assert 0 <= attr(process, "celery.message.queue_time") < 1.0
    assert queue_time_max(work) < 1.0
    assert destinations_seen(token) == {
        "messaging.client.sent.messages": {work, fq},
        "messaging.client.operation.duration": {work, fq},
        "messaging.client.consumed.messages": {work, fq},
        "messaging.process.duration": {work, fq},
        "celery.message.queue_time": {work, fq},
    }


def test_redis_topic_direct_and_default_exchanges(redis_url, exporter, tracer, producer_side):
    """Redis: a topic queue reached by a key of the task's own, a direct exchange, the
    default queue: each named by its queue on both spans and the consumed counts.
    (No countdown here: Celery 5.3's in-process worker runs no eta task once an earlier
    worker stopped in the same process; test_prefork.py checks a countdown's time in
    queue on Redis in a subprocess.)"""
    token = uuid.uuid4().hex[:8]
    topic, direct = Exchange(f"rt-{token}", type="topic"), Exchange(f"rd-{token}", type="direct")
    rwork = Queue(f"rwork-{token}", topic, routing_key=f"rwork-{token}.#")
    rdirect = Queue(f"rdirect-{token}", direct, routing_key=f"k-{token}")
    plain = Queue(f"plain-{token}")
    app, t = make_app(redis_url, task_queues=[rwork, rdirect, plain], task_default_queue=plain.name)
    with worker(app):
        with tracer.start_as_current_span("request"):
            # queue= and a key of its own: kombu's Redis channel knows an exchange's
            # type only once this process declares it (Celery declares the queue).
            keyed = t.add.apply_async((1, 1), queue=rwork.name, routing_key=f"rwork-{token}.high")
            directed = t.add.apply_async((1, 3), queue=rdirect.name)
            default = t.add.apply_async((1, 4))
        assert [r.get(timeout=30) for r in (keyed, directed, default)] == [2, 4, 5]
        for result, queue in ((keyed, rwork), (directed, rdirect), (default, plain)):
            send, process = sent_and_processed(result.id, exporter)
            assert (attr(send, DEST), attr(process, DEST)) == (queue.name, queue.name)
    assert destinations_seen(token)["messaging.client.consumed.messages"] == {
        rwork.name, rdirect.name, plain.name}


def test_queue_length_of_a_quorum_queue_counts_ready_messages_only(quorum):
    """celery.queue.length reads a quorum queue's ready messages; a countdown message
    parked in a delay level (celery_delayed_N) is not counted until it arrives."""
    token, app, t = quorum
    work = f"work-{token}"
    with Connection(app.conf.broker_url) as conn:
        for queue in app.amqp.queues.values():
            queue.bind(conn.default_channel).declare()
    # What the worker's DelayedDelivery bootstep declares, without a worker.
    from kombu.transport.native_delayed_delivery import (
        bind_queue_to_native_delayed_delivery_exchange,
        declare_native_delayed_delivery_exchanges_and_queues,
    )

    with Connection(app.conf.broker_url) as conn:
        declare_native_delayed_delivery_exchanges_and_queues(conn, "quorum")
        bind_queue_to_native_delayed_delivery_exchange(conn, app.amqp.queues[work])
    for i in range(3):
        t.add.delay(i, i)
    for i in range(2):
        t.add.apply_async((i, i), countdown=300)
    lengths = QueueLengths(app, lambda: [work], interval_s=0.2)
    lengths.start()
    try:
        deadline = time.monotonic() + 20
        while lengths.lengths != {work: 3}:
            assert time.monotonic() < deadline, lengths.lengths
            time.sleep(0.1)
        time.sleep(0.5)
        assert lengths.lengths == {work: 3}
    finally:
        lengths.stop()
        lengths._thread.join(10)
        with Connection(app.conf.broker_url) as conn:
            app.amqp.queues[work].bind(conn.default_channel).delete()
