"""``celery.queue.length``: messages waiting in the broker, read by a thread of our own.

Why a thread and not the metric callback: the SDK runs observable callbacks while it
holds a lock that it does not reset after ``fork``. A broker round trip inside that
lock, on a provider that prefork children inherit, can leave a child (recycled by
``--max-tasks-per-child``) frozen at exit. So this thread asks the broker about as
often as metrics are exported, and the callback only returns the last answer.

How: a passive ``queue_declare`` answers with the number of ready messages, without
creating anything. RabbitMQ counts the ready messages (prefetched, unacknowledged
ones are the worker's ``reserved`` tasks, not waiting). kombu's Redis channel sums
the queue's list and its priority sub-lists (``_size`` over ``priority_steps``, kombu
5.3 to 5.7), unacknowledged messages sit in its ``unacked`` hash and do not count.
A queue the broker does not know has no waiting message: Redis deletes an emptied
list, so NOT_FOUND there is the usual answer for an idle queue; RabbitMQ closes the
channel after a NOT_FOUND, so a new channel is opened.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

logger = logging.getLogger("otel_celery_headers")

#: Brokers whose passive declare we have checked (kombu's Redis channel, RabbitMQ).
SYSTEMS = ("redis", "rabbitmq")
#: One broker round trip waits at most this long; our thread alone waits.
TIMEOUT_S = 5.0
# The timeout, under each transport's own names: redis-py's socket options, py-amqp's
# socket read and write timeouts (connect_timeout covers connect and handshake).
_TIMEOUT_OPTIONS = ("socket_timeout", "socket_connect_timeout", "read_timeout", "write_timeout")


def _not_found(exc: BaseException) -> bool:
    # py-amqp's NotFound carries 404; kombu's virtual channel raises a ChannelError
    # with reply_code '404' (a string).
    return str(getattr(exc, "reply_code", "")) == "404"


class QueueLengths:
    """A daemon thread refreshing ``lengths`` (queue name -> waiting messages).

    ``queues()`` names the queues to read: empty until the worker consumes, None once
    it has stopped (the thread then ends).
    """

    def __init__(
        self,
        app: Any,
        queues: Callable[[], Sequence[str] | None],
        interval_s: float,
        timeout_s: float = TIMEOUT_S,
    ) -> None:
        self._app = app
        self._queues = queues
        self._interval = interval_s
        self._timeout = timeout_s
        #: Replaced whole, never mutated: the SDK's collection thread reads it.
        #: Empty while the broker does not answer: an unknown length is not exported.
        self.lengths: dict[str, int] = {}
        self._stop = threading.Event()
        self._connection: Any = None
        self._channel: Any = None
        self._logged = False
        self._thread = threading.Thread(
            target=self._run, name="otel-celery-queue-length", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Never waits: the thread notices within one broker timeout and closes its connection."""
        self._stop.set()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                found = self._queues()
                if found is None:
                    return
                names = list(found)
                if names:
                    self.lengths = self._read(names)
                # Until the consumer has its queues, look again soon.
                self._stop.wait(self._interval if names else min(self._interval, 0.5))
        finally:
            self.lengths = {}
            self._close()

    def _read(self, names: list[str]) -> dict[str, int]:
        try:
            return {name: self._length(name) for name in names}
        except Exception as exc:  # noqa: BLE001 - a broker problem must never leave this thread
            self._close()
            if not self._logged:
                self._logged = True
                logger.warning(
                    "otel-celery-headers: cannot read queue lengths from the broker (%s: %s); "
                    "retrying every %.1f s, celery.queue.length is not exported meanwhile "
                    "and further failures are not logged",
                    type(exc).__name__,
                    exc,
                    self._interval,
                )
            return {}

    def _length(self, name: str) -> int:
        channel = self._open_channel()
        try:
            _, count, _ = channel.queue_declare(queue=name, passive=True)
        except Exception as exc:
            if not _not_found(exc):
                raise
            if getattr(channel, "is_open", True) is False:
                self._channel = None  # RabbitMQ closed it: open another next time
            return 0
        return int(count)

    def _open_channel(self) -> Any:
        if self._connection is None:
            # The worker's own read URL and transport options, with our short timeouts.
            connection = self._app.connection_for_read(
                connect_timeout=self._timeout,
                transport_options=dict.fromkeys(_TIMEOUT_OPTIONS, self._timeout),
            )
            self._connection = connection
            connection.ensure_connection(max_retries=0)  # one attempt, no retry sleeps
        if self._channel is None:
            self._channel = self._connection.channel()
        return self._channel

    def _close(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            try:
                # collect(): drop sockets without a closing handshake, which a broker
                # that stopped answering would make us wait for.
                connection.collect()
            except Exception:  # noqa: BLE001, S110 - best effort on a broken connection
                pass
