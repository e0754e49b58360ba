"""Unit tests of the header Getter/Setter and baggage bounding (no Celery involved)."""

from __future__ import annotations

from types import SimpleNamespace

from otel_celery_headers.carrier import HeaderSetter, RequestGetter, bound_baggage, drop_fields, find_header

TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def request(**attrs):
    attrs.setdefault("headers", None)
    return SimpleNamespace(**attrs)


def test_top_level_attribute_wins():
    """A top-level header (what we and the official instrumentation write) is read first."""
    assert find_header(request(traceparent=TP, headers={"traceparent": "other"}), "traceparent") == TP


def test_custom_headers_nested_headers_and_seed_carrier_are_read():
    """Celery's custom headers, Sentry/Datadog's nested dict and the seed's otel_context are all found."""
    assert find_header(request(headers={"traceparent": TP}), "traceparent") == TP
    assert find_header(request(headers={"headers": {"traceparent": TP}}), "traceparent") == TP
    assert find_header(request(otel_context={"traceparent": TP}), "traceparent") == TP
    assert find_header(request(headers={"otel_context": {"traceparent": TP}}), "traceparent") == TP


def test_non_string_values_are_absent_not_errors():
    """Numbers, lists, dicts, bytes and None under a trace key read as absent."""
    for value in (1, 1.5, ["a"], {"a": 1}, b"bytes", None):
        assert find_header(request(traceparent=value), "traceparent") is None
        assert find_header(request(headers={"traceparent": value}), "traceparent") is None
        assert find_header(request(headers={"headers": value}), "traceparent") is None
        assert find_header(request(otel_context=value), "traceparent") is None


def test_getter_returns_a_list_and_lists_keys():
    """The propagator Getter contract: a list of values, or None."""
    getter = RequestGetter()
    carrier = request(traceparent=TP, headers={"headers": {"baggage": "a=1"}})
    assert getter.get(carrier, "traceparent") == [TP]
    assert getter.get(carrier, "baggage") == ["a=1"]
    assert getter.get(carrier, "tracestate") is None
    assert "baggage" in getter.keys(carrier)


def test_setter_overwrites_stale_values():
    """A retried message's old traceparent is replaced, never kept."""
    headers = {"traceparent": "old"}
    HeaderSetter().set(headers, "traceparent", TP)
    assert headers == {"traceparent": TP}


def test_drop_fields_removes_only_propagation_fields():
    """Stale propagation fields go; the user's own headers stay."""
    headers = {"traceparent": "old", "tracestate": "x", "x-user": "kept"}
    drop_fields(headers, {"traceparent", "tracestate", "baggage"})
    assert headers == {"x-user": "kept"}


def test_bound_baggage_keeps_whole_members_in_order():
    """Oversized baggage is cut member by member from the end, and the count of dropped members is returned."""
    value = ",".join(f"k{i}={'v' * 10}" for i in range(10))
    bounded, dropped = bound_baggage(value, 40)
    assert len(bounded.encode()) <= 40
    assert bounded == "k0=vvvvvvvvvv,k1=vvvvvvvvvv"
    assert dropped == 8
    assert bound_baggage("a=1", 8192) == ("a=1", 0)
    assert bound_baggage("a=" + "v" * 100, 10) == ("", 1)
