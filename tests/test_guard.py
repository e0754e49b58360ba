"""_guard.report: an error inside our code is logged once per kind, never more, even past the cap."""

from __future__ import annotations

import logging

import pytest

from otel_celery_headers import _guard

ONCE = (
    "otel-celery-headers: error in {} ignored (the task is unaffected; "
    "further errors of this kind are not logged)"
)
FULL = (
    "otel-celery-headers: error in {} ignored (the task is unaffected); "
    "256 kinds of error have been logged, new kinds are no longer logged"
)


@pytest.fixture
def lines(caplog, monkeypatch):
    """Messages of the otel_celery_headers logger; the log-once memory starts empty."""
    monkeypatch.setattr(_guard, "_seen", set())
    caplog.set_level(logging.DEBUG, logger="otel_celery_headers")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "otel_celery_headers"]


def test_one_line_per_place_and_exception_type(lines):
    """The same (place, type) twice is one line; another place or another type is another line."""
    _guard.report("publish", ValueError("a"))
    _guard.report("publish", ValueError("b"))
    _guard.report("publish", KeyError("c"))
    _guard.report("publish end", ValueError("d"))
    _guard.report("publish end", ValueError("e"))
    assert lines() == [
        ONCE.format("publish"), ONCE.format("publish"), ONCE.format("publish end"),
    ]


def test_past_the_cap_new_kinds_are_not_logged_and_no_kind_twice(lines):
    """256 kinds logged, then one line saying the cap is reached, then silence: neither new kinds
    nor any kind already logged appear again (before the fix, every error past the cap was
    logged on every occurrence)."""
    for n in range(256):
        _guard.report(f"place {n}", ValueError(n))
    assert lines() == [ONCE.format(f"place {n}") for n in range(256)]
    _guard.report("place 256", ValueError(256))
    for _ in range(3):
        _guard.report("place 256", ValueError(256))
        _guard.report("place 257", ValueError(257))
        _guard.report("place 0", ValueError(0))
        _guard.report("place 255", KeyError(255))
    assert lines()[256:] == [FULL.format("place 256")]
    assert len(lines()) == 257


def test_the_exception_is_attached_to_its_line(caplog, lines):
    """The line carries the exception itself (its traceback is in the log)."""
    error = RuntimeError("exporter down")
    _guard.report("flush after task", error)
    (record,) = [r for r in caplog.records if r.name == "otel_celery_headers"]
    assert record.levelno == logging.WARNING
    assert record.exc_info is not None and record.exc_info[1] is error


def test_a_broken_logging_setup_does_not_raise(lines, monkeypatch):
    """A logger that raises (a broken handler or config) never turns into an error in the caller."""
    def broken(*args, **kwargs):
        raise OSError("log disk full")

    monkeypatch.setattr(_guard.logger, "warning", broken)
    _guard.report("publish", ValueError("x"))  # does not raise
    assert lines() == []
