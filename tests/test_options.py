"""Options from instrument() keywords and OTEL_PYTHON_CELERY_HEADERS_* variables."""

from __future__ import annotations

import pytest

from otel_celery_headers import options


def shape_of_len(name: str) -> str:
    return "link" if len(name) > 5 else "child"


def test_defaults(monkeypatch):
    """Nothing set: no exclusions, child shape, W3C's 8192-byte baggage cap, 5 s flush."""
    for key in list(__import__("os").environ):
        if key.startswith(options.ENV_PREFIX):
            monkeypatch.delenv(key)
    opts = options.load({})
    assert opts.exclude_tasks == () and opts.trace_shape == "child"
    assert opts.max_baggage_bytes == 8192 and opts.flush_timeout_ms == 5000
    assert opts.chord_links is True
    assert opts.for_task("anything") == (False, "child")


def test_environment_is_read_at_load_time(monkeypatch):
    """Variables set after import are obeyed, since they are read in load()."""
    monkeypatch.setenv("OTEL_PYTHON_CELERY_HEADERS_EXCLUDE_TASKS", "celery.*, health.check")
    monkeypatch.setenv("OTEL_PYTHON_CELERY_HEADERS_TRACE_SHAPE", "reports.*=link,untrusted.*=ignore")
    monkeypatch.setenv("OTEL_PYTHON_CELERY_HEADERS_MAX_BAGGAGE_BYTES", "100")
    monkeypatch.setenv("OTEL_PYTHON_CELERY_HEADERS_FLUSH_TIMEOUT_MS", "0")
    monkeypatch.setenv("OTEL_PYTHON_CELERY_HEADERS_CHORD_LINKS", " Off ")
    opts = options.load({})
    assert opts.chord_links is False
    assert opts.for_task("celery.chord_unlock") == (True, "child")
    assert opts.for_task("health.check") == (True, "child")
    assert opts.for_task("reports.daily") == (False, "link")
    assert opts.for_task("untrusted.hook") == (False, "ignore")
    assert opts.for_task("orders.process") == (False, "child")
    assert opts.max_baggage_bytes == 100 and opts.flush_timeout_ms == 0


def test_keywords_beat_environment(monkeypatch):
    """A keyword wins over its variable."""
    monkeypatch.setenv("OTEL_PYTHON_CELERY_HEADERS_TRACE_SHAPE", "ignore")
    assert options.load({"trace_shape": "link"}).for_task("x") == (False, "link")


def test_shape_callable_from_keyword_and_from_environment(monkeypatch):
    """trace_shape accepts a callable, or module:function in the environment."""
    assert options.load({"trace_shape": shape_of_len}).for_task("longname")[1] == "link"
    monkeypatch.setenv("OTEL_PYTHON_CELERY_HEADERS_TRACE_SHAPE", "tests.test_options:shape_of_len")
    assert options.load({}).for_task("abc")[1] == "child"


def test_bad_environment_value_is_logged_and_ignored(monkeypatch, caplog):
    """A typo in the environment keeps the default and says so; it never stops the program."""
    monkeypatch.setenv("OTEL_PYTHON_CELERY_HEADERS_MAX_BAGGAGE_BYTES", "lots")
    monkeypatch.setenv("OTEL_PYTHON_CELERY_HEADERS_TRACE_SHAPE", "sideways")
    monkeypatch.setenv("OTEL_PYTHON_CELERY_HEADERS_CHORD_LINKS", "maybe")
    opts = options.load({})
    assert opts.max_baggage_bytes == 8192 and opts.trace_shape == "child"
    assert opts.chord_links is True
    assert "OTEL_PYTHON_CELERY_HEADERS_CHORD_LINKS" in caplog.text
    assert "OTEL_PYTHON_CELERY_HEADERS_MAX_BAGGAGE_BYTES" in caplog.text
    assert "OTEL_PYTHON_CELERY_HEADERS_TRACE_SHAPE" in caplog.text


def test_bad_keyword_raises():
    """A wrong keyword value is the caller's bug: a clear ValueError."""
    with pytest.raises(ValueError):
        options.load({"trace_shape": "sideways"})
    with pytest.raises(ValueError):
        options.load({"max_baggage_bytes": -1})
    with pytest.raises(ValueError):
        options.load({"chord_links": "no"})


def test_raising_shape_callable_falls_back_to_child():
    """A user callable that raises gives the default shape, not an error in the task."""
    def broken(name: str) -> str:
        raise RuntimeError("nope")

    assert options.load({"trace_shape": broken}).for_task("x") == (False, "child")
