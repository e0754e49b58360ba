"""Errors inside the instrumentation are logged once per kind and swallowed.

Our code runs on every publish and every task; a bug in it must never reach the
user's call, and must not flood the log either (one line per task would).
"""

from __future__ import annotations

import logging
import threading

logger = logging.getLogger("otel_celery_headers")

# Bounded: one entry per (place, exception type). The number of places is fixed by
# the code; the cap protects against a pathological stream of distinct types. Past
# the cap new kinds are no longer logged (one line says so): logging them on every
# occurrence instead would be the flood this module exists to prevent.
_MAX_SEEN = 256
_seen: set[tuple[str, type[BaseException]]] = set()
# Stored in _seen once the cap is reached, so replacing _seen (as the tests do) also
# resets the cap.
_FULL = ("", BaseException)
# Reentrant: a Python signal handler running on this thread inside the lock may report too.
_lock = threading.RLock()


def report(where: str, exc: BaseException) -> None:
    """Log ``exc`` raised inside our code at ``where``, once per kind."""
    key = (where, type(exc))
    if key in _seen:
        return
    # Two threads failing the same way at once must still give one line.
    with _lock:
        if key in _seen or _FULL in _seen:
            return
        full = len(_seen) >= _MAX_SEEN
        _seen.add(_FULL if full else key)
    try:
        if full:
            logger.warning(
                "otel-celery-headers: error in %s ignored (the task is unaffected); "
                "%d kinds of error have been logged, new kinds are no longer logged",
                where,
                _MAX_SEEN,
                exc_info=exc,
            )
        else:
            logger.warning(
                "otel-celery-headers: error in %s ignored (the task is unaffected; "
                "further errors of this kind are not logged)",
                where,
                exc_info=exc,
            )
    except Exception:  # noqa: BLE001,S110 - a broken logging config must not break a publish
        pass
