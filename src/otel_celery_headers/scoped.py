"""Publishing process: ``with trace_shape("link"):`` chooses the shape of what is published inside.

The choice travels in the message (``TRACE_SHAPE_HEADER``), so the worker needs no
configuration for it; it covers every message published in the block, in this thread
or task (a ContextVar: threads and asyncio tasks each have their own), e.g. the
thousand messages of one ``group(...).delay()``. Messages a worker publishes later
(chain steps, callbacks) are outside the block and keep the worker's own rule.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from .options import SHAPES, TraceShape, _shape

_scoped: ContextVar[TraceShape | None] = ContextVar("otel_celery_trace_shape", default=None)

#: Whether trace_shape() was ever entered in this process: until then a publish reads
#: this one global, not the ContextVar (the hot path with the feature unused).
used = False


@contextmanager
def trace_shape(shape: str) -> Iterator[None]:
    """The trace shape (``child``, ``link``, ``ignore``) of every message published in the block.

    Raises ``ValueError`` for anything else, at the ``with``: like a wrong option, a
    typo must not pass silently. Blocks nest; the innermost wins.
    """
    checked = _shape(shape)
    if checked is None:
        raise ValueError(
            f"otel-celery-headers: trace_shape({shape!r}): expected one of {', '.join(SHAPES)}"
        )
    global used
    used = True
    token = _scoped.set(checked)
    try:
        yield
    finally:
        _scoped.reset(token)


def current() -> TraceShape | None:
    """The shape asked for by the innermost ``trace_shape()`` block here, if any."""
    return _scoped.get()
