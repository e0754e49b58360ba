"""Fixtures shared by test modules: import the ones a module needs by name.

``clean_environment`` is autouse: importing it into a module applies it to every test
there.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from otel_celery_headers import _guard, options
from tests.conftest import instrument


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No OTEL_PYTHON_CELERY_HEADERS_* variable from the outside reaches a test."""
    for key in list(os.environ):
        if key.startswith(options.ENV_PREFIX):
            monkeypatch.delenv(key)


@pytest.fixture
def our_log(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[[], list[logging.LogRecord]]]:
    """Records of the otel_celery_headers logger; the log-once memory starts empty."""
    caplog.set_level(logging.DEBUG, logger="otel_celery_headers")
    saved = _guard._seen
    _guard._seen = set()
    yield lambda: [r for r in caplog.records if r.name == "otel_celery_headers"]
    _guard._seen = saved


@pytest.fixture
def instrumented_with() -> Iterator[Callable[..., None]]:
    """instrument(**kwargs) for this test, undone after it."""
    made: list[Any] = []

    def make(**kwargs: Any) -> None:
        made.append(instrument(**kwargs))

    yield make
    for instrumentor in made:
        instrumentor.uninstrument()
