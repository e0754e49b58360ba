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

Only an instrumentation that reads the key is silenced. opentelemetry-instrumentation-redis
reads it from 0.60b0 (open-telemetry/opentelemetry-python-contrib#2057, fixed by #3955);
before, every command is a span whatever the context says, and nothing we could set
short of patching its wrappers or faking a non-sampled parent span (which would also
hide the delivery spans log lines and metrics relate to) changes that. instrument()
says so once (``ignoring_instrumentations``) instead of promising what cannot happen.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from importlib import metadata
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
_log = logging.getLogger(__name__)
#: Whether this process ever made a quiet context: a web app's publishes never do, and
#: ``lifted`` then costs them one global read instead of a context lookup.
_ever = False

# Client instrumentations of a broker or result backend, and the first release that
# honours the suppression key: opentelemetry-python-contrib#3955 (0.60b0) for Redis.
_HONOURS_FROM = {"opentelemetry-instrumentation-redis": (0, 60)}


def _release(version: str) -> tuple[int, int] | None:
    """``0.49b0`` -> (0, 49); None for what does not read as major.minor."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else None


def ignoring_instrumentations() -> list[str]:
    """The installed client instrumentations (``name==version``) too old to read the
    suppression key: the worker's traffic through them stays traced."""
    found = []
    for name, first in _HONOURS_FROM.items():
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        release = _release(version)
        if release is not None and release < first:
            found.append(f"{name}=={version}")
    return found


def warn_if_ignored() -> None:
    """Once per instrument() with suppress_broker_traffic on."""
    for found in ignoring_instrumentations():
        _log.warning(
            "suppress_broker_traffic cannot silence %s: it ignores OpenTelemetry's "
            "suppression before 0.60b0 (opentelemetry-python-contrib#3955), so the "
            "worker's own Redis commands stay root spans; upgrade it to silence them",
            found,
        )


def quieted(base: Context | None = None) -> Context:
    """``base`` (or the current context) with instrumentation suppressed, by us."""
    global _ever
    _ever = True
    # One new Context, not one per key (set_value copies the whole context each time):
    # the main process does this around every delivery's log lines (logcontext.py).
    values = dict(otel_context.get_current() if base is None else base)
    values[_SUPPRESS] = True
    if _SUPPRESS_PLAIN is not None:
        values[_SUPPRESS_PLAIN] = True
    values[_OURS] = True
    return Context(values)


def is_quiet(ctx: Context | None = None) -> bool:
    return otel_context.get_value(_OURS, ctx) is True


def carried(base: Context) -> Context:
    """``base`` made current in place of the current context keeps our suppression
    (logcontext.py, deliveries.py: Celery's own writes while a log line's context is
    current)."""
    return quieted(base) if is_quiet() else base


def lifted(ctx: Context) -> Context:
    """``ctx`` without our suppression: a real publish's transport spans are wanted."""
    if not _ever or otel_context.get_value(_OURS, ctx) is not True:
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
