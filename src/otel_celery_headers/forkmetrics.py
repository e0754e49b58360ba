"""Pool children export only the metric points they recorded themselves.

A prefork pool child is a ``fork`` of the worker's main process, and so is its copy
of the SDK's metric storage, with every point the main process had recorded before
the fork; the SDK restarts the child's ``PeriodicExportingMetricReader`` after the
fork, and the child exports the copy again. On SDK 1.28 child and parent share one
resource, so the copy is a second writer of the parent's cumulative streams; newer
SDKs give the child a new ``service.instance.id`` (``MeterProvider._handle_fork``), so
the copy is a new set of streams per child, growing with every recycle under
``--max-tasks-per-child``. Worker deliveries are recorded in the main process only
(deliveries.py); right after a fork, the child forgets its copy of our instruments'
storage (never the user's instruments), so what it exports is what it recorded.

SDK internals (same names in 1.28 and 1.45): an instrument's ``_measurement_consumer``
holds one ``MetricReaderStorage`` per reader in ``_reader_storages``, each keeping the
instrument's aggregations in ``_instrument_view_instrument_matches``. Removing the
instrument's entry is what a fresh process has; the SDK re-creates it on the next
measurement. If the internals differ, this is logged once and skipped. No lock is
taken: right after ``fork`` the child has one thread, and a lock another thread of the
parent held at the fork (the reader's collection holds each storage's lock) would never
be released in the child. For the same reason each storage our instruments use gets a
fresh lock: the SDK takes it to re-create our entry, at the child's first measurement.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from typing import Any

from ._guard import report

_RLOCK = type(threading.RLock())
_instruments: list[Any] = []
_registered = False


def forget_in_children(instruments: Iterable[Any]) -> None:
    """From now on, forked children drop their copy of these instruments' points."""
    global _registered
    _instruments[:] = list(instruments)
    if not _registered and hasattr(os, "register_at_fork"):
        # Hooks cannot be unregistered: one per process, reading the current list.
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _registered = True


def stop() -> None:
    _instruments.clear()


def _after_fork_in_child() -> None:
    for instrument in _instruments:
        try:
            forget(instrument)
        except Exception as exc:  # noqa: BLE001 - SDK internals differ: carry on
            report("forget inherited metric points after fork", exc)


def forget(instrument: Any) -> None:
    # An API proxy (created before a MeterProvider was set) points at the SDK's.
    real = getattr(instrument, "_real_instrument", None) or instrument
    consumer = getattr(real, "_measurement_consumer", None)
    if consumer is None:
        # No SDK behind it (no-op meter, or an API proxy never backed): nothing stored.
        return
    storages: dict[Any, Any] = consumer._reader_storages
    for storage in list(storages.values()):
        storage._instrument_view_instrument_matches.pop(real, None)
        if isinstance(storage._lock, _RLOCK):
            storage._lock = threading.RLock()
