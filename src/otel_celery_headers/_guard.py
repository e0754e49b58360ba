"""Errors inside the instrumentation are logged once per kind and swallowed.

Our code runs on every publish and every task; a bug in it must never reach the
user's call, and must not flood the log either (one line per task would).
"""

from __future__ import annotations

import logging

logger = logging.getLogger("otel_celery_headers")

# Bounded: one entry per (place, exception type). The number of places is fixed by
# the code; the cap protects against a pathological stream of distinct types.
_MAX_SEEN = 256
_seen: set[tuple[str, type[BaseException]]] = set()


def report(where: str, exc: BaseException) -> None:
    """Log ``exc`` raised inside our code at ``where``, once per kind."""
    key = (where, type(exc))
    if key in _seen:
        return
    if len(_seen) < _MAX_SEEN:
        _seen.add(key)
    try:
        logger.warning(
            "otel-celery-headers: error in %s ignored (the task is unaffected; "
            "further errors of this kind are not logged)",
            where,
            exc_info=exc,
        )
    except Exception:  # noqa: BLE001 - a broken logging config must not break a publish
        pass
