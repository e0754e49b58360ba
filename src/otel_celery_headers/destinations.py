"""``messaging.destination.name``: the queue a message is routed to, on both sides.

Runs in the publishing process (producer.py, from ``before_task_publish``'s exchange
and routing key) and wherever a delivery is seen (consumer.py in the pool child,
deliveries.py / mainprocess.py in the worker's main process, from the delivery's
exchange and routing key). Neither side is told the queue: AMQP delivers an exchange and
a routing key, and kombu's Redis transport copies the same two. So the name is
resolved against the app's kombu ``Queue`` declarations the way the broker routes:

* the default exchange (``""``, where Celery sends every direct-exchange message,
  celery/app/amqp.py ``send_task_message``): the routing key *is* the queue name, no
  lookup (the usual Celery setup);
* another exchange: the queues bound to it whose binding matches the routing key
  (direct: equal; topic: AMQP's ``*`` / ``#`` words; fanout and headers: all). One
  queue name if they agree; otherwise (a fanout to several queues, a queue the app
  does not declare) the exchange's name: bounded, as a metric attribute must be;
* RabbitMQ native delayed delivery (Celery 5.5+, quorum queues on a topic or fanout
  exchange, a countdown or eta): Celery republishes to ``celery_delayed_27`` with the
  routing key prefixed by the delay in 28 binary words
  (kombu/transport/native_delayed_delivery.py ``calculate_routing_key``), and the
  message reaches the queue through ``celery_delayed_delivery`` and the ``#.<key>``
  bindings the worker adds (``bind_queue_to_native_delayed_delivery_exchange``).
  Without care the destination is a new name per delay (issue 18). The delay words
  are dropped and the queue is the one whose ``#.<key>`` binding matches, whatever
  exchange it is bound on.

The worker resolves among the queues it consumes (``app.amqp.queues.consume_from``),
the publisher among all the app declares. Each answer is cached per (exchange, key),
per role, until the app's queue table changes size (``task_create_missing_queues``
adds to it): the hot path is a dict lookup for a non-default exchange, nothing more
for the default one.
"""

from __future__ import annotations

from typing import Any, Final

from ._guard import report

#: The words ``calculate_routing_key`` prepends: 28 of "0." / "1." (kombu 5.5 to 5.7).
_DELAY_WORDS: Final = 28
_DELAY_PREFIX_LEN: Final = 2 * _DELAY_WORDS
#: A cache never grows past this; beyond, it starts over (a bound, never reached by
#: an app whose routing keys are a fixed set).
_CACHE_MAX: Final = 1024


def undelayed(routing_key: str) -> str | None:
    """The routing key without native delayed delivery's delay words; None if it has none."""
    if len(routing_key) <= _DELAY_PREFIX_LEN or routing_key[_DELAY_PREFIX_LEN - 1] != ".":
        return None
    prefix = routing_key[:_DELAY_PREFIX_LEN]
    if prefix[1::2].strip(".") or prefix[0::2].strip("01"):
        return None
    return routing_key[_DELAY_PREFIX_LEN:]


def topic_matches(pattern: str, key: str) -> bool:
    """AMQP topic matching: ``*`` is one word, ``#`` zero or more."""
    return _match(pattern.split("."), 0, key.split("."), 0)


def _match(pattern: list[str], p: int, words: list[str], w: int) -> bool:
    while p < len(pattern):
        part = pattern[p]
        if part == "#":
            if p + 1 == len(pattern):
                return True
            return any(_match(pattern, p + 1, words, i) for i in range(w, len(words) + 1))
        if w == len(words) or (part != "*" and part != words[w]):
            return False
        p += 1
        w += 1
    return w == len(words)


def _bindings(queue: Any) -> list[tuple[str, str, str]]:
    """(exchange name, exchange type, binding key) of each binding a kombu Queue declares."""
    found = []
    exchange = getattr(queue, "exchange", None)
    if exchange is not None and getattr(exchange, "name", None):
        found.append((str(exchange.name), str(exchange.type or "direct"),
                      str(getattr(queue, "routing_key", "") or "")))
    for bound in getattr(queue, "bindings", None) or ():
        ex = getattr(bound, "exchange", None)
        if ex is not None and getattr(ex, "name", None):
            found.append((str(ex.name), str(ex.type or "direct"),
                          str(getattr(bound, "routing_key", "") or "")))
    return found


def _binds(queue: Any, exchange: str | None, key: str) -> bool:
    """Whether the broker routes (exchange, key) to ``queue``; exchange None: a native
    delayed delivery, matched on the ``#.<binding key>`` bindings Celery's worker adds."""
    for name, kind, binding in _bindings(queue):
        if exchange is None:
            if kind == "direct":
                continue  # native delayed delivery skips direct exchanges
            # Matched against the key without its delay words, which the leading "#"
            # also covers (a binding starting "*." could match a delay word: not
            # modelled, its queue would be named by the key).
            pattern = binding if binding.startswith("#") else f"#.{binding}"
            if topic_matches(pattern, key):
                return True
            continue
        if name != exchange:
            continue
        if kind == "direct":
            if binding == key:
                return True
        elif kind == "topic":
            if topic_matches(binding, key):
                return True
        else:  # fanout, headers (their arguments are not evaluated here)
            return True
    return False


def _queue_name(queue: Any) -> str:
    # kombu's Broadcast gives every consumer a queue of its own ("bcast.<uuid>"): the
    # name it was declared under (alias) is the bounded one.
    if type(queue).__name__ == "Broadcast" and getattr(queue, "alias", None):
        return str(queue.alias)
    return str(queue.name)


def resolve(queues: Any, exchange: str | None, key: str) -> str:
    """The one queue of ``queues`` (name -> kombu Queue) that (exchange, key) reaches;
    else the exchange, else the key."""
    names = {_queue_name(q) for q in list(queues.values()) if _binds(q, exchange, key)}
    if len(names) == 1:
        return names.pop()
    return exchange or key


class Resolver:
    """``resolve()`` cached for one role (publishing or consuming) of a process."""

    __slots__ = ("_cache", "_consuming", "_of", "_size")

    def __init__(self, consuming: bool) -> None:
        self._consuming = consuming
        self._of: Any = None
        self._size = -1
        self._cache: dict[tuple[str | None, str], str] = {}

    def name(self, app: Any, exchange: object, routing_key: object) -> str:
        """The destination of a message sent to (exchange, routing key) by ``app``."""
        ex = exchange if type(exchange) is str else str(getattr(exchange, "name", exchange) or "")
        key = routing_key if type(routing_key) is str else str(routing_key or "")
        stripped = undelayed(key) if ex else None
        if stripped is not None:
            ex_or_delayed: str | None = None
            key = stripped
        elif not ex:
            return key  # the default exchange routes by queue name
        else:
            ex_or_delayed = ex
        try:
            table = app.amqp.queues
            queues = table.consume_from if self._consuming else table
            if queues is not self._of or len(queues) != self._size or len(self._cache) > _CACHE_MAX:
                self._of, self._size, self._cache = queues, len(queues), {}
            cache_key = (ex_or_delayed, key)
            found = self._cache.get(cache_key)
            if found is None:
                found = self._cache[cache_key] = resolve(queues, ex_or_delayed, key)
            return found
        except Exception as exc:  # noqa: BLE001 - an odd queue table must not break a task
            report("destination", exc)
            return ex or key


PUBLISHING: Final = Resolver(consuming=False)
CONSUMING: Final = Resolver(consuming=True)


def of_delivery(app: Any, delivery_info: Any) -> str:
    """The destination of a delivery, from its ``delivery_info`` (Celery's Request or
    kombu's Message: both carry ``exchange`` and ``routing_key``)."""
    if not isinstance(delivery_info, dict):
        return ""
    exchange = delivery_info.get("exchange")
    key = delivery_info.get("routing_key") or ""
    if not exchange and type(key) is str:
        return key  # the default exchange, the usual delivery: no call further
    return CONSUMING.name(app, exchange or "", key)
