"""Worker: its own broker and result-backend traffic makes no traces of its own.

With a Redis client instrumentation active (``opentelemetry-bootstrap -a install``
puts opentelemetry-instrumentation-redis beside us), every command kombu sends for the
worker is a one-span root trace: polling (BRPOP/EVALSHA), acks and the unacked
bookkeeping (ZADD/HSET, ZREM/HDEL), pidbox replies, heartbeats, events (PUBLISH),
the result backend's writes from the main process, our queue-length reads (LLEN).
An idle worker exports dozens of them a minute.

We run that traffic under OpenTelemetry's suppression key, which client
instrumentations honour (``is_instrumentation_enabled()``), attached and detached in
the same frame around the long-running code that makes it:

* ``Consumer.start``: the consumer's blueprint and its event loop, until the consumer
  stops; in every pool this is where polling, acks, pidbox and events happen.
* ``kombu.Message.ack`` / ``reject`` / ``requeue``: the threads pool acknowledges from
  its executor threads (``Request.on_accepted`` runs there), outside the loop.
* timer entries (``kombu.asynchronous.timer.Entry``: heartbeats, the unacked
  restore; gevent and eventlet run each in a greenlet of its own), the green pools'
  pidbox greenlet (``celery.worker.pidbox.gPidbox.loop``), our queue-length thread.
* ``Consumer.stop`` / ``shutdown``: the warm shutdown's pidbox unbind and cleanup.

What must stay loud is let through, never guessed from the command:

* a task's own calls: consumer.py makes the task's context current from a fresh
  ``Context`` (inbound.extract), which has no suppression key, in every pool;
* a real publish: producer.py lifts *our* suppression (a second key says it is ours,
  a user's ``suppress_instrumentation()`` stays) in the context its ``send`` span makes
  current, so the transport's spans nest under it;
* pool children: billiard forks replacement children from inside the event loop, so
  the fork runs under an empty context and no child inherits the suppression.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY as _SUPPRESS
from opentelemetry.context import Context
from opentelemetry.instrumentation import utils as instrumentation_utils

# Older instrumentations read the plain string key.
_SUPPRESS_PLAIN: str | None = getattr(
    instrumentation_utils, "_SUPPRESS_INSTRUMENTATION_KEY_PLAIN", None
)
_OURS = otel_context.create_key("otel_celery_headers.quiet")


def quieted(base: Context | None = None) -> Context:
    """``base`` (or the current context) with instrumentation suppressed, by us."""
    ctx = otel_context.set_value(_SUPPRESS, True, base)
    if _SUPPRESS_PLAIN is not None:
        ctx = otel_context.set_value(_SUPPRESS_PLAIN, True, ctx)
    return otel_context.set_value(_OURS, True, ctx)


def is_quiet(ctx: Context | None = None) -> bool:
    return otel_context.get_value(_OURS, ctx) is True


def carried(base: Context) -> Context:
    """``base`` made current in place of the current context keeps our suppression
    (logcontext.py, deliveries.py: Celery's own writes while a log line's context is
    current)."""
    return quieted(base) if is_quiet() else base


def lifted(ctx: Context) -> Context:
    """``ctx`` without our suppression: a real publish's transport spans are wanted."""
    if otel_context.get_value(_OURS, ctx) is not True:
        return ctx
    ctx = otel_context.set_value(_SUPPRESS, False, ctx)
    if _SUPPRESS_PLAIN is not None:
        ctx = otel_context.set_value(_SUPPRESS_PLAIN, False, ctx)
    return otel_context.set_value(_OURS, False, ctx)


class Quiet:
    """The wrappers; installed only when ``suppress_broker_traffic`` is on."""

    def __init__(self) -> None:
        self.active = True

    def wrap_quiet(
        self, wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any
    ) -> Any:
        # Already quiet (an ack from inside the consumer loop, the usual case): no
        # second context.
        if not self.active or is_quiet():
            return wrapped(*args, **kwargs)
        token = otel_context.attach(quieted())
        try:
            return wrapped(*args, **kwargs)
        finally:
            otel_context.detach(token)

    def wrap_fork(
        self, wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any
    ) -> Any:
        """billiard's Pool._create_worker_process: the child starts with no context."""
        token = otel_context.attach(Context())
        try:
            return wrapped(*args, **kwargs)
        finally:
            otel_context.detach(token)
