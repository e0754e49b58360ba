"""Options from instrument() keywords and OTEL_PYTHON_CELERY_HEADERS_* variables, and their checks."""

from __future__ import annotations

import dataclasses
import logging
import os

import pytest
from opentelemetry.trace import SpanKind

from otel_celery_headers import CeleryHeadersInstrumentor, InstrumentKwargs, options
from tests.conftest import METER_PROVIDER, PROVIDER, make_app
from tests.support.fixtures import clean_environment, our_log  # noqa: F401 - fixtures
from tests.support.instrumentation import fully_instrumented, nothing_instrumented
from tests.support.spans import parent_id, span_id, trace_id

C = SpanKind.CONSUMER
DEFAULTS = options.Options()


def shape_of_len(name: str) -> str:
    return "link" if len(name) > 5 else "child"


not_callable = 42


def test_defaults():
    """Nothing set: no exclusions, child shape, W3C's 8192-byte baggage cap, 5 s flush."""
    opts = options.load({})
    assert opts == DEFAULTS
    assert opts.exclude_tasks == () and opts.trace_shape == "child"
    assert opts.max_baggage_bytes == 8192 and opts.flush_timeout_ms == 5000
    assert opts.child_flush_interval_ms == 200 and opts.chord_links is True
    assert opts.suppress_broker_traffic is True
    assert opts.publish_hook is None and opts.process_hook is None
    assert opts.for_task("anything") == (False, "child")


def test_the_table_the_typed_keywords_and_the_fields_agree():
    """Every option has a row, a typed keyword and an Options field (adding one touches all three)."""
    rows = {o.name for o in options.OPTIONS}
    fields = {f.name for f in dataclasses.fields(options.Options)} - {"_cache"}
    assert rows == fields
    assert set(InstrumentKwargs.__annotations__) == rows | {"tracer_provider", "meter_provider"}
    assert {o.env for o in options.OPTIONS} == {
        "OTEL_PYTHON_CELERY_HEADERS_" + name.upper() for name in rows
    }


def test_environment_is_read_at_load_time(monkeypatch, our_log):
    """Variables set after import are obeyed, since they are read in load(); nothing is logged."""
    monkeypatch.setenv("OTEL_PYTHON_CELERY_HEADERS_EXCLUDE_TASKS", "celery.*, health.check,")
    monkeypatch.setenv("OTEL_PYTHON_CELERY_HEADERS_TRACE_SHAPE", "reports.*=link, untrusted.*=IGNORE")
    monkeypatch.setenv("OTEL_PYTHON_CELERY_HEADERS_MAX_BAGGAGE_BYTES", "100")
    monkeypatch.setenv("OTEL_PYTHON_CELERY_HEADERS_FLUSH_TIMEOUT_MS", " 0 ")
    monkeypatch.setenv("OTEL_PYTHON_CELERY_HEADERS_CHILD_FLUSH_INTERVAL_MS", "50")
    monkeypatch.setenv("OTEL_PYTHON_CELERY_HEADERS_CHORD_LINKS", " Off ")
    monkeypatch.setenv("OTEL_PYTHON_CELERY_HEADERS_SUPPRESS_BROKER_TRAFFIC", "false")
    opts = options.load({})
    assert opts.exclude_tasks == ("celery.*", "health.check")
    assert opts.trace_shape == {"reports.*": "link", "untrusted.*": "ignore"}
    assert opts.chord_links is False
    assert opts.suppress_broker_traffic is False
    assert opts.for_task("celery.chord_unlock") == (True, "child")
    assert opts.for_task("health.check") == (True, "child")
    assert opts.for_task("reports.daily") == (False, "link")
    assert opts.for_task("untrusted.hook") == (False, "ignore")
    assert opts.for_task("orders.process") == (False, "child")
    assert opts.max_baggage_bytes == 100 and opts.flush_timeout_ms == 0
    assert opts.child_flush_interval_ms == 50
    assert our_log() == []


def test_keywords_beat_environment(monkeypatch):
    """A keyword wins over its variable; a keyword given as None counts as not given."""
    monkeypatch.setenv("OTEL_PYTHON_CELERY_HEADERS_TRACE_SHAPE", "ignore")
    monkeypatch.setenv("OTEL_PYTHON_CELERY_HEADERS_MAX_BAGGAGE_BYTES", "100")
    assert options.load({"trace_shape": "link"}).for_task("x") == (False, "link")
    assert options.load({"trace_shape": None}).for_task("x") == (False, "ignore")
    assert options.load({"max_baggage_bytes": 0}).max_baggage_bytes == 0
    assert options.load({"max_baggage_bytes": None}).max_baggage_bytes == 100


def test_string_exclude_tasks_is_comma_separated_globs():
    """exclude_tasks="celery.*" is one glob (it was once split into characters, one of them "*")."""
    opts = options.load({"exclude_tasks": "celery.*"})
    assert opts.exclude_tasks == ("celery.*",)
    assert opts.for_task("t.add") == (False, "child")
    assert opts.for_task("celery.chord_unlock") == (True, "child")
    assert options.load({"exclude_tasks": " celery.*, health.* ,"}).exclude_tasks == (
        "celery.*", "health.*",
    )
    assert options.load({"exclude_tasks": ["celery.*", " health.* "]}).exclude_tasks == (
        "celery.*", "health.*",
    )
    assert options.load({"exclude_tasks": ("celery.*",)}).exclude_tasks == ("celery.*",)
    assert options.load({"exclude_tasks": []}).exclude_tasks == ()


def test_shape_names_are_case_insensitive():
    """"Link", " IGNORE " and {"reports.*": "LINK"} are link, ignore and link (globs keep their case)."""
    assert options.load({"trace_shape": "Link"}).trace_shape == "link"
    assert options.load({"trace_shape": " IGNORE "}).trace_shape == "ignore"
    opts = options.load({"trace_shape": {"Reports.*": "LINK"}})
    assert opts.trace_shape == {"Reports.*": "link"}
    assert opts.for_task("Reports.daily") == (False, "link")
    assert opts.for_task("reports.daily") == (False, "child")
    assert options.load({"trace_shape": lambda name: " Ignore"}).for_task("x") == (False, "ignore")


def test_shape_mapping_is_copied_first_match_wins():
    """A mapping is read once at instrument(): later changes to the caller's dict do not count."""
    rules = {"reports.daily": "ignore", "reports.*": "link"}
    opts = options.load({"trace_shape": rules})
    rules["orders.*"] = "link"
    assert opts.for_task("reports.daily") == (False, "ignore")
    assert opts.for_task("reports.weekly") == (False, "link")
    assert opts.for_task("orders.process") == (False, "child")


def test_shape_callable_from_keyword_and_from_environment(monkeypatch):
    """trace_shape accepts a callable, or module:function in the environment."""
    assert options.load({"trace_shape": shape_of_len}).for_task("longname")[1] == "link"
    monkeypatch.setenv("OTEL_PYTHON_CELERY_HEADERS_TRACE_SHAPE", "tests.test_options:shape_of_len")
    opts = options.load({})
    assert opts.trace_shape is shape_of_len
    assert opts.for_task("abc") == (False, "child") and opts.for_task("longname") == (False, "link")


def test_hooks_from_environment(monkeypatch):
    """publish_hook / process_hook as module:function, attribute paths included."""
    monkeypatch.setenv("OTEL_PYTHON_CELERY_HEADERS_PUBLISH_HOOK", "tests.test_options:shape_of_len")
    monkeypatch.setenv("OTEL_PYTHON_CELERY_HEADERS_PROCESS_HOOK", "os.path:join")
    opts = options.load({})
    assert opts.publish_hook is shape_of_len and opts.process_hook is os.path.join


# -- bad keywords: ValueError naming the keyword and the value, nothing instrumented -------------

BAD_KEYWORDS = [
    ({"exclude_tasks": 5}, "exclude_tasks=5",
     "expected a list of globs, or a string of comma-separated globs"),
    ({"exclude_tasks": b"celery.*"}, "exclude_tasks=b'celery.*'",
     "expected a list of globs, or a string of comma-separated globs"),
    ({"exclude_tasks": {"celery.*": True}}, "exclude_tasks={'celery.*': True}",
     "expected a list of globs, or a string of comma-separated globs"),
    ({"exclude_tasks": ["celery.*", ""]}, "exclude_tasks=['celery.*', '']",
     "glob '' is not a non-empty string"),
    ({"exclude_tasks": ["celery.*", 7]}, "exclude_tasks=['celery.*', 7]",
     "glob 7 is not a non-empty string"),
    ({"trace_shape": "sideways"}, "trace_shape='sideways'", "expected one of child, link, ignore"),
    ({"trace_shape": {"reports.*": "lnik"}}, "trace_shape={'reports.*': 'lnik'}",
     "glob 'reports.*' has shape 'lnik', not one of child, link, ignore"),
    ({"trace_shape": {"reports.*": "link", " ": "ignore"}}, "trace_shape={' ': 'ignore', 'reports.*': 'link'}",
     "glob ' ' is not a non-empty string"),
    ({"trace_shape": {"reports.*": None}}, "trace_shape={'reports.*': None}",
     "glob 'reports.*' has shape None, not one of child, link, ignore"),
    ({"trace_shape": 42}, "trace_shape=42",
     "expected one of child, link, ignore, a {glob: shape} mapping or a callable"),
    ({"max_baggage_bytes": True}, "max_baggage_bytes=True", "expected an int >= 0"),
    ({"max_baggage_bytes": 100.0}, "max_baggage_bytes=100.0", "expected an int >= 0"),
    ({"max_baggage_bytes": "100"}, "max_baggage_bytes='100'", "expected an int >= 0"),
    ({"max_baggage_bytes": -1}, "max_baggage_bytes=-1", "expected an int >= 0"),
    ({"flush_timeout_ms": 2.5}, "flush_timeout_ms=2.5", "expected an int >= 0"),
    ({"flush_timeout_ms": False}, "flush_timeout_ms=False", "expected an int >= 0"),
    ({"child_flush_interval_ms": -200}, "child_flush_interval_ms=-200", "expected an int >= 0"),
    ({"publish_hook": 42}, "publish_hook=42", "expected a callable or None"),
    ({"process_hook": "tests.test_options:shape_of_len"},
     "process_hook='tests.test_options:shape_of_len'", "expected a callable or None"),
    ({"chord_links": "no"}, "chord_links='no'", "expected True or False"),
    ({"chord_links": 0}, "chord_links=0", "expected True or False"),
    ({"suppress_broker_traffic": "off"}, "suppress_broker_traffic='off'", "expected True or False"),
    ({"exclude_task": ["celery.*"]}, "exclude_task=['celery.*']",
     "unknown keyword; did you mean exclude_tasks?"),
    ({"colour": "blue"}, "colour='blue'", "unknown keyword"),
    ({"tracer_provider": "global"}, "tracer_provider='global'",
     "expected None or an object with get_tracer()"),
    ({"meter_provider": PROVIDER}, None, "expected None or an object with get_meter()"),
]


@pytest.mark.parametrize(("kwargs", "shown", "reason"), BAD_KEYWORDS)
def test_bad_keyword_raises_naming_it_and_instruments_nothing(kwargs, shown, reason):
    """instrument() raises ValueError naming the keyword and the value; nothing is wrapped or
    connected, the instrumentor is not marked instrumented, and a correct instrument() then works."""
    if shown is None:
        (name, value), = kwargs.items()
        shown = f"{name}={value!r}"
    expected = f"otel-celery-headers: instrument({shown}): {reason}"
    with pytest.raises(ValueError) as raised:
        options.load(kwargs)
    assert str(raised.value) == expected

    kwargs = {"tracer_provider": PROVIDER, "meter_provider": METER_PROVIDER, **kwargs}
    instrumentor = CeleryHeadersInstrumentor()
    assert nothing_instrumented()
    with pytest.raises(ValueError) as raised:
        instrumentor.instrument(**kwargs)
    assert str(raised.value) == expected
    assert nothing_instrumented()
    assert instrumentor.is_instrumented_by_opentelemetry is False
    instrumentor.instrument(tracer_provider=PROVIDER, meter_provider=METER_PROVIDER)
    try:
        assert fully_instrumented()
    finally:
        instrumentor.uninstrument()
    assert nothing_instrumented()


def test_a_long_value_is_shortened_in_the_message():
    """A huge wrong value does not make a huge message."""
    with pytest.raises(ValueError) as raised:
        options.load({"trace_shape": "x" * 10_000})
    assert len(str(raised.value)) < 200


def test_keywords_opentelemetry_passes_are_accepted():
    """Auto-instrumentation and distros pass these to every instrumentor: accepted, unused."""
    assert options.load({
        "skip_dep_check": True, "raise_exception_on_conflict": True,
        "logger_provider": object(), "event_logger_provider": object(),
        "tracer_provider": None, "meter_provider": METER_PROVIDER,
    }) == DEFAULTS


# -- bad environment variables: one log line naming the variable, the default kept ---------------

BAD_ENVIRONMENT = [
    ("TRACE_SHAPE", "sideways", "expected one of child, link, ignore"),
    ("TRACE_SHAPE", "reports.*=lnik",
     "glob 'reports.*' has shape 'lnik', not one of child, link, ignore"),
    ("TRACE_SHAPE", "reports.*=link,lnik", "'lnik' is not glob=shape"),
    ("TRACE_SHAPE", "=link", "glob '' is not a non-empty string"),
    ("TRACE_SHAPE", "tests.test_options:no_such_function",
     "module 'tests.test_options' has no attribute 'no_such_function'"),
    ("PUBLISH_HOOK", "no_such_module_here:hook", "No module named 'no_such_module_here'"),
    ("PUBLISH_HOOK", "tests.test_options", "expected module:function"),
    ("PROCESS_HOOK", "tests.test_options:not_callable", "tests.test_options:not_callable is not callable"),
    ("MAX_BAGGAGE_BYTES", "lots", "expected a whole number >= 0"),
    ("MAX_BAGGAGE_BYTES", "100.0", "expected a whole number >= 0"),
    ("FLUSH_TIMEOUT_MS", "-1", "expected a whole number >= 0"),
    ("CHILD_FLUSH_INTERVAL_MS", "1e3", "expected a whole number >= 0"),
    ("CHORD_LINKS", "maybe", "expected one of 1, true, yes, on, 0, false, no, off"),
]


@pytest.mark.parametrize(("suffix", "raw", "reason"), BAD_ENVIRONMENT)
def test_bad_environment_value_is_logged_once_and_ignored(monkeypatch, our_log, suffix, raw, reason):
    """A typo in the environment keeps the default and says so in one line; it never raises."""
    variable = "OTEL_PYTHON_CELERY_HEADERS_" + suffix
    name = suffix.lower()
    monkeypatch.setenv(variable, raw)
    assert options.load({}) == DEFAULTS
    (record,) = our_log()
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        f"otel-celery-headers: ignoring {variable}={raw!r} ({reason}); "
        f"{name} keeps its default {getattr(DEFAULTS, name)!r}"
    )


def test_bad_environment_shape_is_ignored_whole_by_instrument(monkeypatch, our_log, exporter, tracer):
    """reports.*=lnik in a rule list: instrument() logs it once and ignores the whole variable, so
    the valid rule next to it is not applied either (t.add stays a child of its caller)."""
    monkeypatch.setenv("OTEL_PYTHON_CELERY_HEADERS_TRACE_SHAPE", "t.add=link,t.fail=lnik")
    instrumentor = CeleryHeadersInstrumentor()
    instrumentor.instrument(tracer_provider=PROVIDER, meter_provider=METER_PROVIDER)
    try:
        app, t = make_app("memory://", backend="cache+memory://", task_always_eager=True)
        with tracer.start_as_current_span("request") as root:
            assert t.add.delay(1, 2).get() == 3
    finally:
        instrumentor.uninstrument()
    (span,) = [s for s in exporter.get_finished_spans() if s.kind == C]
    assert span.name == "process t.add"
    assert trace_id(span) == trace_id(root) and parent_id(span) == span_id(root)
    assert [r.getMessage() for r in our_log()] == [
        "otel-celery-headers: ignoring OTEL_PYTHON_CELERY_HEADERS_TRACE_SHAPE='t.add=link,t.fail=lnik' "
        "(glob 't.fail' has shape 'lnik', not one of child, link, ignore); "
        "trace_shape keeps its default 'child'"
    ]


@pytest.mark.parametrize(("exclude", "spans"), [("celery.*", 1), ("celery.*,t.*", 0)])
def test_string_exclude_tasks_through_instrument(exporter, tracer, exclude, spans):
    """instrument(exclude_tasks="celery.*") still traces t.add; "celery.*,t.*" excludes it."""
    instrumentor = CeleryHeadersInstrumentor()
    instrumentor.instrument(tracer_provider=PROVIDER, meter_provider=METER_PROVIDER, exclude_tasks=exclude)
    try:
        app, t = make_app("memory://", backend="cache+memory://", task_always_eager=True)
        with tracer.start_as_current_span("request"):
            assert t.add.delay(1, 2).get() == 3
    finally:
        instrumentor.uninstrument()
    assert len([s for s in exporter.get_finished_spans() if s.name == "process t.add"]) == spans


# -- a trace_shape callable's answer, checked when used ---------------------------------------


def test_invalid_callable_answer_is_logged_once_and_is_child(our_log):
    """A callable answering "lnik" gives child, for every task, with one log line in all."""
    opts = options.load({"trace_shape": lambda name: "lnik"})
    assert opts.for_task("reports.daily") == (False, "child")
    assert opts.for_task("reports.weekly") == (False, "child")
    assert options.load({"trace_shape": lambda name: None}).for_task("x") == (False, "child")
    (record,) = our_log()
    assert record.getMessage() == (
        "otel-celery-headers: error in trace_shape callable's answer ignored "
        "(the task is unaffected; further errors of this kind are not logged)"
    )
    assert str(record.exc_info[1]) == (
        "it returned 'lnik' for task 'reports.daily', not one of child, link, ignore: using child"
    )


def test_raising_shape_callable_falls_back_to_child(our_log):
    """A user callable that raises gives the default shape, not an error in the task; logged once."""
    def broken(name: str) -> str:
        raise RuntimeError("nope")

    opts = options.load({"trace_shape": broken})
    assert opts.for_task("x") == (False, "child")
    assert opts.for_task("y") == (False, "child")
    (record,) = our_log()
    assert record.getMessage().startswith("otel-celery-headers: error in trace_shape callable ignored")
    assert isinstance(record.exc_info[1], RuntimeError)
