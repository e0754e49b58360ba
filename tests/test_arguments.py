"""Task arguments on spans (record_arguments): rendering, redaction, limits, options, a real worker."""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.trace import SpanKind

from otel_celery_headers import options
from otel_celery_headers.arguments import ARGS, KWARGS, Recorder, Redaction, Renderer
from tests.conftest import METRICS, instrument, make_app, wait_for, worker
from tests.support.fixtures import clean_environment, our_log  # noqa: F401 - fixtures
from tests.support.spans import attr, one

P, C = SpanKind.PRODUCER, SpanKind.CONSUMER
DEFAULT = Renderer(Redaction.of(()), 256, 2048)


# -- rendering ------------------------------------------------------------------------


def test_plain_values_render_like_python_literals_tuples_as_lists():
    """Strings, numbers, None, bools, bytes, nested lists and dicts; a tuple shows as a list."""
    found = DEFAULT.attributes((1, 2.5, "a", None, True, b"\x00b", (1, [2])), {"x": {"y": [1]}})
    assert found == {
        ARGS: "[1, 2.5, 'a', None, True, b'\\x00b', [1, [2]]]",
        KWARGS: "{'x': {'y': [1]}}",
    }


def test_no_arguments_given_means_no_attribute():
    """None for args or kwargs (a protocol 1 body without them) gives no attribute; empty ones do."""
    assert DEFAULT.attributes(None, None) == {}
    assert DEFAULT.attributes((), {}) == {ARGS: "[]", KWARGS: "{}"}


def test_a_long_value_is_cut_and_says_how_much():
    """Past max_value characters a string says "...[truncated N chars]"; bytes say how many there were."""
    renderer = Renderer(Redaction.of(()), 10, 2048)
    found = renderer.attributes(["x" * 1234, b"y" * 50], None)
    assert found == {
        ARGS: "['xxxxxxxxxx'...[truncated 1224 chars], b'yyyyyyyy...[truncated, 50 bytes in all]]"
    }


class _Raises:
    def __repr__(self) -> str:
        raise RuntimeError("no repr for you")


class _Huge:
    def __repr__(self) -> str:
        return "H" * 100_000


class _NotStr:
    def __repr__(self) -> Any:
        return 42


def test_hostile_objects_render_safely():
    """A raising repr, a huge repr, a repr that is not a str, a 5000-digit int, recursion."""
    loop: list[Any] = [1]
    loop.append(loop)
    cycle: dict[str, Any] = {}
    cycle["me"] = cycle
    renderer = Renderer(Redaction.of(()), 20, 4096)
    found = renderer.attributes([_Raises(), _Huge(), _NotStr(), 10**5000, loop], cycle)
    assert found == {
        ARGS: "[<_Raises object (repr failed: RuntimeError)>, "
        "HHHHHHHHHHHHHHHHHHHH...[truncated 99980 chars], <_NotStr object (repr failed: TypeError)>, "
        "<int object (repr failed: ValueError)>, [1, [...recursive]]]",
        KWARGS: "{'me': {...recursive}}",
    }


def test_non_str_keys_and_deep_nesting():
    """Keys of any type render by repr; containers past the depth limit show as [...]."""
    deep: Any = "bottom"
    for _ in range(20):
        deep = [deep]
    found = DEFAULT.attributes([deep], {1: "a", (2, 3): "b", None: "c", b"k": "d"})
    assert found == {
        ARGS: "[[[[[[[...]]]]]]]",
        KWARGS: "{1: 'a', (2, 3): 'b', None: 'c', b'k': 'd'}",
    }


def test_many_items_are_cut_and_counted():
    """A container shows its first 64 items, then how many more it had; a million costs 64."""
    found = DEFAULT.attributes([list(range(1_000_000))], None)
    assert found[ARGS] == "[[" + ", ".join(str(i) for i in range(64)) + ", ...[999936 more]]]"


def test_total_cap_holds_for_both_attributes_together():
    """args and kwargs together never pass max_total; what was cut says so."""
    renderer = Renderer(Redaction.of(()), 256, 100)
    found = renderer.attributes(["a" * 200], {"k": "b" * 200})
    assert found[ARGS] == "['" + "a" * 84 + "...[truncated]"
    assert len(found[ARGS]) == 100
    assert found[KWARGS] == ""


class _BadMapping(OrderedDict):
    def items(self) -> Any:
        raise OSError("gone")


def test_a_container_that_fails_to_iterate_says_so():
    """A mapping whose items() raises renders what it could, and the rest of the arguments."""
    found = DEFAULT.attributes([_BadMapping(a=1), 2], None)
    assert found == {ARGS: "[{...[unreadable: OSError]}, 2]"}


_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(), st.binary(),
    st.builds(_Raises), st.builds(_Huge), st.builds(_NotStr),
)
_values = st.recursive(
    _leaves,
    lambda inner: st.one_of(
        st.lists(inner), st.tuples(inner, inner), st.frozensets(_leaves, max_size=5),
        st.dictionaries(st.one_of(st.text(), st.integers(), st.binary()), inner),
    ),
    max_leaves=60,
)


@settings(max_examples=300, deadline=None)
@given(
    args=_values, kwargs=_values,
    max_value=st.integers(0, 300), max_total=st.integers(0, 3000),
)
def test_never_raises_and_never_passes_the_cap(args, kwargs, max_value, max_total):
    """Any value, any limits: a dict of str attributes, at most max_total characters in all."""
    found = Renderer(Redaction.of(("ssn",)), max_value, max_total).attributes(args, kwargs)
    assert set(found) <= {ARGS, KWARGS}
    assert all(type(v) is str for v in found.values())
    assert sum(len(v) for v in found.values()) <= max_total


def test_a_long_key_is_cut_at_128_characters():
    """Keys have their own fixed limit, so a small value limit still shows which key is which."""
    found = Renderer(Redaction.of(()), 4, 2048).attributes(None, {"k" * 200: "value"})
    assert found == {KWARGS: "{'" + "k" * 128 + "'...[truncated 72 chars]: 'valu'...[truncated 1 chars]}"}


class _Span:
    def __init__(self, recording: bool, fails: bool = False) -> None:
        self.recording, self.fails, self.attributes = recording, fails, {}

    def is_recording(self) -> bool:
        return self.recording

    def set_attributes(self, attributes: dict[str, str]) -> None:
        if self.fails:
            raise RuntimeError("exporter bug")
        self.attributes.update(attributes)


def test_recorder_reads_both_body_protocols_and_only_recording_spans(our_log):
    """Protocol 2's (args, kwargs, embed) and protocol 1's dict; an unrecorded span renders
    nothing; a failure is logged once and swallowed."""
    recorder = Recorder(options.load({"record_arguments": "t.*"}))
    span = _Span(True)
    recorder.record_body(span, "t.add", ([1], {"y": 2}, {}))
    assert span.attributes == {ARGS: "[1]", KWARGS: "{'y': 2}"}
    span = _Span(True)
    recorder.record_body(span, "t.add", {"task": "t.add", "args": [1], "kwargs": {}})
    assert span.attributes == {ARGS: "[1]", KWARGS: "{}"}
    span = _Span(True)
    recorder.record_body(span, "other", ([1], {}, {}))
    assert span.attributes == {}
    recorder.record_body(_Span(False, fails=True), "t.add", ([1], {}, {}))
    assert our_log() == []
    recorder.record(_Span(True, fails=True), "t.add", [1], {})
    recorder.record(_Span(True, fails=True), "t.add", [1], {})
    assert [r.getMessage() for r in our_log()] == [
        "otel-celery-headers: error in record_arguments ignored (the task is unaffected; "
        "further errors of this kind are not logged)"
    ]
    assert Recorder.of(options.load({})) is None


# -- redaction ------------------------------------------------------------------------


def test_default_keys_are_redacted_case_insensitive_substring_and_nested():
    """password, secret, token, authorization, api_key, cookie: in any case, inside a key, at any depth."""
    kwargs = {
        "Password": "p", "db_password_old": "p", "client_secret": "s", "X-Auth-Token": "t",
        "Authorization": "Bearer x", "API-KEY": "k", "api_key": "k", "set_cookie": "c",
        "user": {"name": "ann", "refresh_token": "t", "deeper": [{"cookie": "c"}]},
        "name": "visible",
    }
    found = DEFAULT.attributes([{"secret": 1, "ok": 2}], kwargs)
    assert found[ARGS] == "[{'secret': '[REDACTED]', 'ok': 2}]"
    assert found[KWARGS] == (
        "{'Password': '[REDACTED]', 'db_password_old': '[REDACTED]', "
        "'client_secret': '[REDACTED]', 'X-Auth-Token': '[REDACTED]', "
        "'Authorization': '[REDACTED]', 'API-KEY': '[REDACTED]', 'api_key': '[REDACTED]', "
        "'set_cookie': '[REDACTED]', 'user': {'name': 'ann', 'refresh_token': '[REDACTED]', "
        "'deeper': [{'cookie': '[REDACTED]'}]}, 'name': 'visible'}"
    )


def test_user_patterns_add_words_and_globs():
    """A plain word is a substring; a pattern with * ? [ is a glob of the whole key; bytes keys too."""
    renderer = Renderer(Redaction.of(["SSN", "card_*", "pin"]), 256, 2048)
    found = renderer.attributes(None, {
        "user_ssn": 1, "card_number": 2, "my_card_number": 3, "PIN": 4, b"pin_code": 5,
        "spinach": 6, "password": 7,
    })
    assert found[KWARGS] == (
        "{'user_ssn': '[REDACTED]', 'card_number': '[REDACTED]', 'my_card_number': 3, "
        "'PIN': '[REDACTED]', b'pin_code': '[REDACTED]', 'spinach': '[REDACTED]', "
        "'password': '[REDACTED]'}"
    )


# -- options --------------------------------------------------------------------------


def test_argument_options_defaults_keywords_and_environment(monkeypatch):
    """Off by default; globs from a keyword or comma-separated in the variables; limits as counts."""
    defaults = options.load({})
    assert defaults.record_arguments == () and defaults.redact_arguments == ()
    assert defaults.max_argument_chars == 256 and defaults.max_arguments_chars == 2048
    opts = options.load({"record_arguments": ["billing.*"], "redact_arguments": "iban, card_*"})
    assert opts.record_arguments == ("billing.*",)
    assert opts.redact_arguments == ("iban", "card_*")
    monkeypatch.setenv("OTEL_PYTHON_CELERY_HEADERS_RECORD_ARGUMENTS", "billing.*, t.add")
    monkeypatch.setenv("OTEL_PYTHON_CELERY_HEADERS_REDACT_ARGUMENTS", "iban")
    monkeypatch.setenv("OTEL_PYTHON_CELERY_HEADERS_MAX_ARGUMENT_CHARS", "64")
    monkeypatch.setenv("OTEL_PYTHON_CELERY_HEADERS_MAX_ARGUMENTS_CHARS", "512")
    opts = options.load({})
    assert opts.record_arguments == ("billing.*", "t.add") and opts.redact_arguments == ("iban",)
    assert opts.max_argument_chars == 64 and opts.max_arguments_chars == 512


def test_a_bad_variable_is_logged_and_ignored(monkeypatch, our_log):
    """A wrong limit in the environment keeps the default and says so."""
    monkeypatch.setenv("OTEL_PYTHON_CELERY_HEADERS_MAX_ARGUMENTS_CHARS", "lots")
    assert options.load({}).max_arguments_chars == 2048
    assert [r.getMessage() for r in our_log()] == [
        "otel-celery-headers: ignoring OTEL_PYTHON_CELERY_HEADERS_MAX_ARGUMENTS_CHARS='lots' "
        "(expected a whole number >= 0); max_arguments_chars keeps its default 2048"
    ]


@pytest.mark.parametrize(("kwargs", "reason"), [
    ({"record_arguments": True}, "expected a list of globs, or a string of comma-separated globs"),
    ({"record_arguments": ["t.*", ""]}, "glob '' is not a non-empty string"),
    ({"redact_arguments": {"password": 1}},
     "expected a list of globs, or a string of comma-separated globs"),
    ({"max_argument_chars": -1}, "expected an int >= 0"),
    ({"max_arguments_chars": "2048"}, "expected an int >= 0"),
])
def test_bad_argument_keywords_raise_naming_them(kwargs, reason):
    """A wrong keyword raises ValueError naming it, its value and why."""
    (name, value), = kwargs.items()
    with pytest.raises(ValueError) as raised:
        options.load(kwargs)
    assert str(raised.value) == f"otel-celery-headers: instrument({name}={value!r}): {reason}"


# -- a real worker and Redis ---------------------------------------------------------


@pytest.fixture(scope="module")
def env(redis_url: str) -> Iterator[SimpleNamespace]:
    app, tasks = make_app(redis_url, task_default_queue="arguments")
    task = functools.partial(app.task, shared=False)

    @task(name="accounts.login")
    def login(user: str, profile: dict[str, Any], **extra: Any) -> str:
        return user

    @task(name="accounts.other")
    def other(user: str) -> str:
        return user

    with worker(app):
        yield SimpleNamespace(app=app, t=tasks, login=login, other=other)


@pytest.fixture
def recording() -> Iterator[None]:
    instrumentor = instrument(
        record_arguments=["accounts.login"], redact_arguments=["ssn"], max_argument_chars=8,
    )
    yield
    instrumentor.uninstrument()


LOGIN_ARGS = "['alice', {'ssn': '[REDACTED]', 'plan': 'pro'}]"
LOGIN_KWARGS = "{'api_key': '[REDACTED]', 'note': 'abcdefgh'...[truncated 4 chars]}"


def test_both_spans_carry_the_arguments_exactly(env, exporter, recording):
    """Publish and process spans of a selected task show the same redacted, cut arguments."""
    result = env.login.delay("alice", {"ssn": "123", "plan": "pro"}, api_key="k", note="abcdefghijkl")
    assert result.get(timeout=20) == "alice"
    process = wait_for(lambda spans: one(spans, result.id, C))
    publish = one(exporter.get_finished_spans(), result.id, P)
    for span in (publish, process):
        assert attr(span, ARGS) == LOGIN_ARGS
        assert attr(span, KWARGS) == LOGIN_KWARGS


def test_send_task_and_apply_async_are_recorded_too(env, exporter, recording):
    """send_task by name and apply_async(args, kwargs) give the same attributes."""
    by_name = env.app.send_task(
        "accounts.login", args=["alice", {"ssn": "1", "plan": "pro"}],
        kwargs={"api_key": "k", "note": "abcdefghijkl"},
    )
    applied = env.login.apply_async(
        ("alice", {"ssn": "1", "plan": "pro"}), {"api_key": "k", "note": "abcdefghijkl"},
    )
    assert by_name.get(timeout=20) == applied.get(timeout=20) == "alice"
    for result in (by_name, applied):
        process = wait_for(lambda spans, r=result: one(spans, r.id, C))
        publish = one(exporter.get_finished_spans(), result.id, P)
        assert [attr(publish, ARGS), attr(publish, KWARGS)] == [LOGIN_ARGS, LOGIN_KWARGS]
        assert [attr(process, ARGS), attr(process, KWARGS)] == [LOGIN_ARGS, LOGIN_KWARGS]


def test_unselected_tasks_and_metrics_carry_no_arguments(env, exporter, recording):
    """A task not named by record_arguments has none on its spans; no metric point has any."""
    result = env.other.delay("bob")
    assert result.get(timeout=20) == "bob"
    process = wait_for(lambda spans: one(spans, result.id, C))
    publish = one(exporter.get_finished_spans(), result.id, P)
    for span in (publish, process):
        assert attr(span, ARGS) is None and attr(span, KWARGS) is None
    data = METRICS.get_metrics_data()
    keys = {
        key
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        for point in metric.data.data_points
        for key in (point.attributes or {})
    }
    assert ARGS not in keys and KWARGS not in keys
    assert "celery.task.name" in keys  # the points were there to look at


def test_off_by_default(env, exporter):
    """Without record_arguments no span carries arguments."""
    instrumentor = instrument()
    try:
        result = env.login.delay("alice", {"plan": "pro"})
        assert result.get(timeout=20) == "alice"
        process = wait_for(lambda spans: one(spans, result.id, C))
        publish = one(exporter.get_finished_spans(), result.id, P)
    finally:
        instrumentor.uninstrument()
    for span in (publish, process):
        assert attr(span, ARGS) is None and attr(span, KWARGS) is None
