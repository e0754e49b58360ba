"""The one live object behind a set of observable instruments (health.py, beat.py).

The SDK cannot remove an instrument, and creating one again under the same name returns
the first one with its first callbacks. So the callbacks read whichever object is current
here, and a later ``instrument()`` (a new object) is obeyed: the old one is closed when the
new one takes its place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Generic, Protocol, TypeVar

from opentelemetry.metrics import CallbackOptions, Observation

from ._guard import report


class _Closable(Protocol):
    def close(self) -> None: ...


T = TypeVar("T", bound=_Closable)


class Current(Generic[T]):
    __slots__ = ("_what", "value")

    def __init__(self, what: str) -> None:
        self._what = what  # names the callback's failure in the one log line
        self.value: T | None = None

    def activate(self, value: T | None) -> None:
        if self.value is not None and self.value is not value:
            self.value.close()
        self.value = value

    def callback(
        self, read: Callable[[T], list[Observation]]
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        """An SDK callback reading the current object; nothing while there is none."""

        def callback(options: CallbackOptions) -> Iterable[Observation]:
            value = self.value
            if value is None:
                return []
            try:
                return read(value)
            except Exception as exc:  # noqa: BLE001 - never fail the SDK's collection
                report(self._what, exc)
                return []

        return callback
