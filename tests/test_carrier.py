"""Unit tests of the header Getter/Setter and baggage bounding (no Celery involved)."""

from __future__ import annotations

from types import SimpleNamespace

from opentelemetry import baggage, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from otel_celery_headers.carrier import (
    CONTEXT_HEADER,
    STRING_GETTER,
    bound_baggage,
    inbound_carrier,
    write_context,
)

TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
OTHER_TP = "00-11111111111111111111111111111111-2222222222222222-01"
DD_TP = "00-000000000000000033b1ed7ea1e4bd24-3d0b3f4ad6ac4bcc-01"
DD_STATE = "dd=s:1;p:3d0b3f4ad6ac4bcc;t.dm:-0"
DATADOG = {"x-datadog-trace-id": "3724419532186713380", "x-datadog-parent-id": "4398497913346722764",
           "x-datadog-sampling-priority": "1", "traceparent": DD_TP, "tracestate": DD_STATE}
SENTRY_BAGGAGE = ("sentry-trace_id=771a43a4192642f0b136d5159a501700,sentry-sample_rate=1.0,"
                  "sentry-sampled=true,sentry-environment=production")
SENTRY = {"sentry-trace": "771a43a4192642f0b136d5159a501700-b7ad6b7169203331-1",
          "baggage": SENTRY_BAGGAGE}
FIELDS = frozenset({"traceparent", "tracestate", "baggage"})
PROPAGATOR = CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()])


def request(**attrs):
    attrs.setdefault("headers", None)
    return SimpleNamespace(**attrs)


def ours(req) -> dict:
    """The fields read as the producer's context, as the propagators would get them."""
    found = inbound_carrier(req, FIELDS)
    return {key: STRING_GETTER.get(found, key)[0] for key in FIELDS if STRING_GETTER.get(found, key)}


def context(req):
    """(traceparent ids, tracestate header, baggage) as the worker's propagators extract them."""
    ctx = PROPAGATOR.extract(inbound_carrier(req, FIELDS), context=Context(), getter=STRING_GETTER)
    span = trace.get_current_span(ctx).get_span_context()
    ids = (f"{span.trace_id:032x}", f"{span.span_id:016x}") if span.is_valid else None
    return ids, span.trace_state.to_header(), dict(baggage.get_all(ctx))


def marked(**fields):
    """A message of our producer: the fields at the top level, and the marker naming them."""
    return {**fields, CONTEXT_HEADER: " ".join(fields)}


# -- the worker: unmarked messages (the official instrumentation, older versions of ours) --


def test_top_level_wins_and_supplies_every_field():
    """A top-level context (ours before the marker, the official instrumentation's) is read whole from there."""
    assert ours(request(traceparent=TP, headers={"traceparent": "other", "tracestate": "x=1"})) == {"traceparent": TP}


def test_custom_headers_nested_headers_and_seed_carrier_are_read():
    """Celery's custom headers, a nested dict nobody else claims and the seed's otel_context are all found."""
    assert ours(request(headers={"traceparent": TP})) == {"traceparent": TP}
    assert ours(request(headers={"headers": {"traceparent": TP}})) == {"traceparent": TP}
    assert ours(request(otel_context={"traceparent": TP})) == {"traceparent": TP}
    assert ours(request(headers={"otel_context": {"traceparent": TP}})) == {"traceparent": TP}


def test_one_place_never_mixes_fields_from_two():
    """Trace state and baggage come from the place the traceparent came from, never from another."""
    req = request(traceparent=TP, headers={"tracestate": "other=1", "baggage": "k=v"},
                  otel_context={"baggage": "seed=1"})
    assert ours(req) == {"traceparent": TP}
    req = request(headers={"traceparent": TP, "headers": {"tracestate": "x=1"}}, otel_context={"baggage": "k=v"})
    assert ours(req) == {"traceparent": TP}
    # A place holding only baggage is a place: the baggage, no trace, nothing from elsewhere.
    assert ours(request(baggage="k=v", headers={"traceparent": TP})) == {"baggage": "k=v"}


def test_non_string_values_are_absent_not_errors():
    """Numbers, lists, dicts, bytes and None under a trace key read as absent."""
    for value in (1, 1.5, ["a"], {"a": 1}, b"bytes", None):
        assert ours(request(traceparent=value)) == {}
        assert ours(request(headers={"traceparent": value})) == {}
        assert ours(request(headers={"headers": value})) == {}
        assert ours(request(otel_context=value)) == {}
        assert ours(request(**{CONTEXT_HEADER: value, "traceparent": TP})) == {"traceparent": TP}


def test_datadog_nested_dict_alone_is_not_ours():
    """ddtrace's nested traceparent/tracestate (with or without x-datadog-*) starts a new trace of ours."""
    assert ours(request(headers=dict(DATADOG))) == {}
    assert ours(request(headers={"headers": dict(DATADOG)})) == {}
    w3c_only = {"traceparent": DD_TP, "tracestate": DD_STATE}
    assert ours(request(headers=w3c_only)) == {}
    assert ours(request(headers={"traceparent": DD_TP, "tracestate": "congo=t61," + DD_STATE})) == {}


def test_official_top_level_with_datadog_nested_takes_no_dd_state():
    """The official instrumentation's top-level traceparent beside ddtrace's nested dict: no dd= trace state."""
    ids, state, _ = context(request(traceparent=TP, headers=dict(DATADOG)))
    assert ids == ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331")
    assert state == ""


def test_sentry_baggage_without_ours_is_not_read():
    """Sentry's baggage (top level and its nested copy, as it writes it) is not OpenTelemetry baggage."""
    assert context(request(baggage=SENTRY_BAGGAGE, headers=dict(SENTRY), **{"sentry-trace": SENTRY["sentry-trace"]})) == (None, "", {})
    # With the official instrumentation's traceparent: the trace, without Sentry's members.
    ids, _, found = context(request(traceparent=TP, baggage=SENTRY_BAGGAGE, headers=dict(SENTRY)))
    assert ids is not None and found == {}


def test_official_baggage_beside_sentry_is_read():
    """The official instrumentation overwrote Sentry's top-level copy with OpenTelemetry baggage: that is ours."""
    _, _, found = context(request(traceparent=TP, baggage="tenant=acme", headers=dict(SENTRY)))
    assert found == {"tenant": "acme"}


# -- the worker: marked messages (ours) ----------------------------------------------


def test_marked_message_reads_exactly_the_named_fields_at_the_top_level():
    """Our marker: the fields it names, from the top level; nothing else counts, wherever it is."""
    req = request(**marked(traceparent=TP), baggage=SENTRY_BAGGAGE, tracestate="x=1",
                  headers={**SENTRY, **DATADOG}, otel_context={"baggage": "seed=1"})
    assert ours(req) == {"traceparent": TP}
    ids, state, found = context(req)
    assert ids == ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331")
    assert (state, found) == ("", {})


def test_marked_message_with_our_baggage_beside_sentry():
    """Ours top level with baggage, Sentry's and ddtrace's nested: our baggage and nothing of theirs."""
    req = request(**marked(traceparent=TP, tracestate="ours=1", baggage="tenant=acme"),
                  headers={**SENTRY, **DATADOG}, **{"sentry-trace": SENTRY["sentry-trace"]})
    ids, state, found = context(req)
    assert ids == ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331")
    assert (state, found) == ("ours=1", {"tenant": "acme"})


def test_empty_marker_means_no_context_of_ours():
    """Our producer had no context to send: theirs is not taken for ours."""
    req = request(**{CONTEXT_HEADER: ""}, baggage=SENTRY_BAGGAGE, headers={**SENTRY, **DATADOG},
                  otel_context={"traceparent": OTHER_TP})
    assert ours(req) == {}


def test_getter_returns_a_list_and_lists_keys():
    """The propagator Getter contract: a list of one string, or None."""
    assert STRING_GETTER.get({"baggage": "a=1", "n": 1}, "baggage") == ["a=1"]
    assert STRING_GETTER.get({"baggage": "a=1", "n": 1}, "n") is None
    assert STRING_GETTER.get({}, "tracestate") is None
    assert STRING_GETTER.keys({"baggage": "a=1", 5: "x"}) == ["baggage"]


# -- the producer --------------------------------------------------------------------


def test_write_context_marks_what_it_wrote():
    """Our fields go to the top level, the marker names them, the user's headers stay."""
    headers = {"x-user": "kept"}
    write_context(headers, {"traceparent": TP, "baggage": "k=v"}, FIELDS, replaces=False)
    assert headers == {"x-user": "kept", "traceparent": TP, "baggage": "k=v",
                       CONTEXT_HEADER: "traceparent baggage"}


def test_stale_context_of_ours_is_replaced():
    """A retry's copied headers: every field the old marker names goes, even with no valid context now."""
    headers = {**marked(traceparent=OTHER_TP, tracestate="old=1", baggage="old=1"), "x-user": "kept"}
    write_context(headers, {"traceparent": TP}, FIELDS, replaces=False)
    assert headers == {"traceparent": TP, "x-user": "kept", CONTEXT_HEADER: "traceparent"}
    headers = marked(traceparent=OTHER_TP, baggage="old=1")
    write_context(headers, {}, FIELDS, replaces=False)
    assert headers == {CONTEXT_HEADER: ""}


def test_stale_unmarked_context_is_replaced_by_a_valid_one():
    """A message of an older version of ours (no marker): its fields go when a valid context replaces them."""
    headers = {"traceparent": OTHER_TP, "tracestate": "old=1", "baggage": "old=1"}
    write_context(headers, {"traceparent": TP}, FIELDS, replaces=True)
    assert headers == {"traceparent": TP, CONTEXT_HEADER: "traceparent"}
    headers = {"traceparent": OTHER_TP, "baggage": "user=1"}
    write_context(headers, {}, FIELDS, replaces=False)
    assert headers == {"traceparent": OTHER_TP, "baggage": "user=1", CONTEXT_HEADER: ""}


def test_sentry_baggage_is_never_deleted():
    """Sentry's top-level baggage (a copy of its nested one) stays when we write no baggage."""
    for stale in ({}, {CONTEXT_HEADER: "traceparent baggage"}):
        headers = {**stale, "sentry-trace": SENTRY["sentry-trace"], "baggage": SENTRY_BAGGAGE,
                   "headers": dict(SENTRY)}
        write_context(headers, {"traceparent": TP}, FIELDS, replaces=True)
        assert headers["baggage"] == SENTRY_BAGGAGE
        assert headers["headers"] == SENTRY
        assert headers[CONTEXT_HEADER] == "traceparent"
        assert ours(request(**headers)) == {"traceparent": TP}


def test_our_baggage_takes_the_top_level_and_leaves_sentrys_nested_copy():
    """Caller baggage beside Sentry: ours at the top level (where the official instrumentation reads), Sentry's
    nested copy, the one Sentry reads, untouched."""
    headers = {"sentry-trace": SENTRY["sentry-trace"], "baggage": SENTRY_BAGGAGE, "headers": dict(SENTRY)}
    write_context(headers, {"traceparent": TP, "baggage": "tenant=acme"}, FIELDS, replaces=True)
    assert headers["baggage"] == "tenant=acme"
    assert headers["headers"] == SENTRY and headers["sentry-trace"] == SENTRY["sentry-trace"]
    assert context(request(**headers))[2] == {"tenant": "acme"}


def test_datadog_headers_are_neither_deleted_nor_read():
    """ddtrace's nested dict survives our publish untouched, and our trace state is ours alone."""
    headers = {"headers": dict(DATADOG)}
    write_context(headers, {"traceparent": TP}, FIELDS, replaces=True)
    assert headers["headers"] == DATADOG
    assert context(request(**headers))[1] == ""


def test_bound_baggage_keeps_whole_members_in_order():
    """Oversized baggage is cut member by member from the end, and the count of dropped members is returned."""
    value = ",".join(f"k{i}={'v' * 10}" for i in range(10))
    bounded, dropped = bound_baggage(value, 40)
    assert len(bounded.encode()) <= 40
    assert bounded == "k0=vvvvvvvvvv,k1=vvvvvvvvvv"
    assert dropped == 8
    assert bound_baggage("a=1", 8192) == ("a=1", 0)
    assert bound_baggage("a=" + "v" * 100, 10) == ("", 1)


# -- the official opentelemetry-instrumentation-celery, across processes --------------


def official_extract(headers: dict):
    """The official instrumentation's worker side: its getter over task.request's attributes."""
    from opentelemetry.instrumentation.celery import celery_getter

    ctx = PROPAGATOR.extract(SimpleNamespace(**headers), context=Context(), getter=celery_getter)
    span = trace.get_current_span(ctx).get_span_context()
    return (f"{span.trace_id:032x}" if span.is_valid else None), dict(baggage.get_all(ctx))


def test_official_worker_reads_our_messages():
    """Our top-level fields are what the official instrumentation reads; the marker is nothing to it."""
    headers = {"headers": dict(SENTRY), "baggage": SENTRY_BAGGAGE, "sentry-trace": SENTRY["sentry-trace"]}
    write_context(headers, {"traceparent": TP, "baggage": "tenant=acme"}, FIELDS, replaces=True)
    assert official_extract(headers) == ("0af7651916cd43dd8448eb211c80319c", {"tenant": "acme"})


def test_official_worker_beside_sentry_reads_sentrys_copy_when_we_have_no_baggage():
    """The documented limit: without caller baggage, the official worker takes Sentry's top-level copy."""
    headers = {"headers": dict(SENTRY), "baggage": SENTRY_BAGGAGE, "sentry-trace": SENTRY["sentry-trace"]}
    write_context(headers, {"traceparent": TP}, FIELDS, replaces=True)
    assert set(official_extract(headers)[1]) == {"sentry-trace_id", "sentry-sample_rate", "sentry-sampled",
                                                 "sentry-environment"}
    assert context(request(**headers))[2] == {}


def test_we_read_the_official_producers_messages():
    """What the official instrumentation injects (propagate.inject into the publish headers, no marker) is read whole."""
    token_ctx = baggage.set_baggage("tenant", "acme", trace.set_span_in_context(trace.NonRecordingSpan(
        trace.SpanContext(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, is_remote=False,
                          trace_flags=trace.TraceFlags(1)))))
    headers = {"headers": dict(SENTRY), "baggage": SENTRY_BAGGAGE, "sentry-trace": SENTRY["sentry-trace"]}
    PROPAGATOR.inject(headers, context=token_ctx)
    assert context(request(**headers)) == (
        ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"), "", {"tenant": "acme"})
