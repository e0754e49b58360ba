"""Publish side: the PRODUCER span around the real publish, and injection.

Two wrapt wrappers mark a publish: ``Task.apply_async`` (``delay``, signatures, canvas,
``retry``) and ``Celery.send_task`` (a web app that knows only a task's name calls
``send_task`` directly). ``apply_async`` calls ``send_task``, so a ContextVar marks a
publish already under way and the inner wrapper passes through: one span per message.

The span is opened in ``before_task_publish``, when the message's id, queue and
headers are known, with the attributes a sampler keys on (``start_attributes``); the
message facts are given at start too under a sampled caller, and otherwise set only if
the span records. Its start time is taken when the wrapper was entered, so it still
covers the whole call. It is made current (the transport's spans nest under it) unless
it does not record and a caller's span is there to take them (see ``_open``). An eager
``apply_async`` never reaches that signal and so has no publish span, without looking
up Celery's configuration.
A call that fails before the signal gets its span, marked ERROR, from the wrapper.

Injection happens in the same signal, into the real message headers Celery is about
to publish, so every message carries the context, also ones published by Celery
itself (chain steps, callbacks, chord bodies) from inside a worker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, MutableMapping
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanContext, SpanKind, Tracer

from . import attributes as attrs
from . import destinations, fanin, quiet, scoped
from ._guard import report
from ._outcome import error_type, mark_failed
from ._state import current_publish
from .arguments import Recorder
from .beat import ENTRY_HEADER, BeatMonitor
from .carrier import (
    CONTEXT_HEADER,
    PREVIOUS_ATTEMPT_HEADER,
    SENT_AT_HEADER,
    TRACE_SHAPE_HEADER,
    bound_baggage,
    propagator_fields,
    span_ref,
    write_context,
)
from .consumer import publishing_from
from .fanin import ChordPart
from .metrics import Instruments
from .options import GlobMatcher, Options
from .sdk_check import SdkCheck

logger = logging.getLogger("otel_celery_headers")

# Message facts copied onto the publish span, from the headers (or protocol 1's body).
_FROM_MESSAGE = (("id", attrs.MESSAGING_MESSAGE_ID), *attrs.MESSAGE_FACTS)


@dataclass(slots=True)
class _Publish:
    """One publish: lives for the duration of one apply_async/send_task call."""

    name: str
    app: Any
    start_ns: int
    started: float
    #: Through Task.apply_async, which runs the task in place under task_always_eager
    #: (send_task never does).
    eager_possible: bool
    span: Span | None = None
    #: The context with ``span`` in it: what is injected into the message.
    context: Context | None = None
    activation: Token[Context] | None = None
    #: None when no MeterProvider is behind our instruments: nothing is recorded.
    metric_attributes: dict[str, Any] | None = None


# The `celery beat` schedule entry being sent, named on its publish span.
_beat_entry: ContextVar[str | None] = ContextVar("otel_celery_beat_entry", default=None)


class Producer:
    def __init__(
        self,
        tracer: Tracer,
        options: Options,
        instruments: Instruments,
        sdk: SdkCheck | None = None,
        beat: BeatMonitor | None = None,
    ) -> None:
        self._tracer = tracer
        self._sdk = sdk or SdkCheck(None, pending=False)
        self._beat = beat
        self._options = options
        self._instruments = instruments
        self._baggage_warned = False
        self._arguments = Recorder.of(options)
        self._no_span = GlobMatcher(options.no_publish_span) if options.no_publish_span else None

    # -- wrapt wrappers -------------------------------------------------------------

    def wrap_apply_async(
        self, wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any
    ) -> Any:
        if current_publish.get() is not None:
            return wrapped(*args, **kwargs)
        try:
            publish = _Publish(
                str(instance.name), instance._get_app(), time.time_ns(), time.perf_counter(), True
            )
        except Exception as exc:  # noqa: BLE001
            report("publish", exc)
            return wrapped(*args, **kwargs)
        return self._traced(wrapped, args, kwargs, publish)

    def wrap_send_task(
        self, wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any
    ) -> Any:
        if current_publish.get() is not None:  # inside apply_async: already marked
            return wrapped(*args, **kwargs)
        try:
            name = args[0] if args else kwargs.get("name")
            publish = _Publish(str(name), instance, time.time_ns(), time.perf_counter(), False)
        except Exception as exc:  # noqa: BLE001
            report("publish", exc)
            return wrapped(*args, **kwargs)
        return self._traced(wrapped, args, kwargs, publish)

    def _traced(
        self, wrapped: Callable[..., Any], args: Any, kwargs: Any, publish: _Publish
    ) -> Any:
        marker = current_publish.set(publish)
        try:
            return wrapped(*args, **kwargs)
        except BaseException as exc:
            # The caller gets this very exception back, untouched (bare raise below).
            self._failed(publish, exc)
            raise
        finally:
            # Restore the caller's context before anything else: even if ending the
            # span failed, the caller must not be left inside our PRODUCER span.
            if publish.activation is not None:
                otel_context.detach(publish.activation)
            current_publish.reset(marker)
            if publish.span is not None or publish.metric_attributes is not None:
                self._end(publish)

    def wrap_beat_apply_async(
        self, wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any
    ) -> Any:
        """``celery beat`` sends a due entry: one new trace per entry, named after it."""
        try:
            entry = args[0] if args else kwargs.get("entry")
            name = getattr(entry, "name", None)
        except Exception as exc:  # noqa: BLE001
            report("beat apply_async", exc)
            name = None
        # A fresh root context: whatever runs beat (`worker -B`, an embedding app)
        # must not become the parent of every periodic task.
        beat = self._beat if name is not None else None
        late = beat.before_send(entry) if beat is not None else None
        activation = otel_context.attach(otel_context.Context())
        marker = _beat_entry.set(str(name) if name is not None else None)
        sent = False
        try:
            result = wrapped(*args, **kwargs)
            sent = True
            return result
        finally:
            _beat_entry.reset(marker)
            otel_context.detach(activation)
            if beat is not None:
                beat.after_send(entry, late, sent)

    def _open(
        self, publish: _Publish, facts: Mapping[str, Any], destination: str
    ) -> Span | None:
        """Start the publish's span; make it current unless nothing can nest under it.

        None for a task of ``no_publish_span``: no span, the caller's context goes
        into the message, and the metrics still count the publish.

        The sampler sees the start attributes. Under a sampled parent the span will
        almost surely record (ParentBased, the SDK's default), so the message facts go
        in at start, in one pass; otherwise they are read and set only if the span
        records, and an unsampled publish does not build them (issue 12).
        """
        system = attrs.messaging_system(publish.app)
        if self._no_span is not None and self._no_span(publish.name):
            caller = otel_context.get_current()
            publish.context = quiet.lifted(caller)
            if publish.context is not caller:
                # Published from the worker's quiet code: the transport's spans are a
                # real publish's, as under a send span (below).
                publish.activation = otel_context.attach(publish.context)
            if self._instruments.recording():
                publish.metric_attributes = attrs.metric_attributes(
                    system, attrs.OPERATION_SEND, publish.name, destination
                )
            return None
        attributes: dict[str, Any] = attrs.start_attributes(
            system, attrs.OPERATION_SEND, destination, publish.name
        )
        caller = otel_context.get_current()
        parent_sampled = attrs.parent_sampled(caller)
        if parent_sampled:
            self._message_attributes(facts, attributes)
        span = self._tracer.start_span(
            f"{attrs.OPERATION_SEND} {publish.name}",
            context=caller,
            kind=SpanKind.PRODUCER,
            attributes=attributes,
            start_time=publish.start_ns,
        )
        recording = span.is_recording()
        if recording and not parent_sampled:
            span.set_attributes(self._message_attributes(facts, {}))
        publish.span = span
        # A publish from the worker's own quiet code (quiet.py) is real traffic: the
        # transport's spans nest under this span.
        publish.context = quiet.lifted(trace.set_span_in_context(span, caller))
        # Current, so that the transport's own spans (redis, amqp) nest under it. An
        # unrecorded span under a valid caller is not: those spans would have a parent
        # nobody recorded, and are better off under the caller, whose sampling decision
        # they follow anyway. Under no caller it is, or each would start a trace of
        # its own that a ratio sampler could keep.
        if (
            recording
            or parent_sampled is None
            # The hint skips the validity check when the flag is set: rare enough
            # (a sampled caller whose child was dropped) to make here.
            or (parent_sampled and not trace.get_current_span(caller).get_span_context().is_valid)
        ):
            publish.activation = otel_context.attach(publish.context)
        if self._instruments.recording():
            publish.metric_attributes = attrs.metric_attributes(
                system, attrs.OPERATION_SEND, publish.name, destination
            )
        return span

    @staticmethod
    def _message_attributes(facts: Mapping[str, Any], into: dict[str, Any]) -> dict[str, Any]:
        """The publish span's attributes beyond the start ones, added to ``into``."""
        into[attrs.MESSAGING_OPERATION_NAME] = attrs.OPERATION_SEND
        for key, attr in _FROM_MESSAGE:
            value = facts.get(key)
            if isinstance(value, str):
                into[attr] = value
        retries = facts.get("retries")
        if isinstance(retries, int):
            into[attrs.CELERY_TASK_RETRIES] = retries
        entry = _beat_entry.get()
        if entry is not None:
            into[attrs.CELERY_BEAT_ENTRY] = entry
        return into

    def _failed(self, publish: _Publish, exc: BaseException) -> None:
        try:
            if publish.span is None:
                if publish.eager_possible and publish.app.conf.task_always_eager:
                    return  # the eager task's own exception: its span says so
                # Failed before the message was built (arguments, routing, ...).
                publish.span = self._tracer.start_span(
                    f"{attrs.OPERATION_SEND} {publish.name}",
                    kind=SpanKind.PRODUCER,
                    attributes={
                        attrs.MESSAGING_SYSTEM: attrs.messaging_system(publish.app),
                        attrs.MESSAGING_OPERATION_TYPE: attrs.OPERATION_SEND,
                        attrs.MESSAGING_OPERATION_NAME: attrs.OPERATION_SEND,
                        attrs.CELERY_TASK_NAME: publish.name,
                    },
                    start_time=publish.start_ns,
                )
            mark_failed(publish.span, exc)
            if publish.metric_attributes is None and self._instruments.recording():
                # Failed before _open: no destination known.
                publish.metric_attributes = attrs.metric_attributes(
                    attrs.messaging_system(publish.app), attrs.OPERATION_SEND, publish.name
                )
            if publish.metric_attributes is not None:
                publish.metric_attributes[attrs.ERROR_TYPE] = error_type(exc)
        except Exception as inner:  # noqa: BLE001
            report("publish failure", inner)

    def _end(self, publish: _Publish) -> None:
        try:
            if publish.span is not None:
                publish.span.end()
            if publish.metric_attributes is not None:
                self._instruments.published(
                    time.perf_counter() - publish.started, publish.metric_attributes
                )
        except Exception as exc:  # noqa: BLE001
            report("publish end", exc)

    # -- before_task_publish --------------------------------------------------------

    def on_before_publish(
        self,
        sender: str | None = None,
        headers: MutableMapping[str, Any] | None = None,
        body: Any = None,
        routing_key: str | None = None,
        exchange: str | None = None,
        **_: Any,
    ) -> None:
        if headers is None:
            return
        if self._sdk.pending:
            self._sdk.run()
        try:
            # Protocol 2 puts the task's facts in the headers, protocol 1 in the body.
            facts = headers if "id" in headers or not isinstance(body, dict) else body
            publish: _Publish | None = current_publish.get()
            if publish is not None and publish.context is None:
                # The queue, not the routing key (a topic key, a native delayed
                # delivery's per-delay key: destinations.py).
                # Celery's usual publish, to the default exchange, is named by its
                # routing key without a call (as Resolver.name would).
                destination = (
                    routing_key
                    if exchange == "" and type(routing_key) is str
                    else destinations.PUBLISHING.name(publish.app, exchange, routing_key)
                )
                span = self._open(publish, facts, destination)
                if self._arguments is not None and span is not None:
                    self._arguments.record_body(span, publish.name, body)
            self._inject(headers, facts, publish)
            hook = self._options.publish_hook
            if hook is not None and publish is not None and publish.span is not None:
                try:
                    hook(publish.span, publish.name, headers)
                except Exception as exc:  # noqa: BLE001 - the user's hook must not break a publish
                    report("publish_hook", exc)
        except Exception as exc:  # noqa: BLE001
            report("before_task_publish", exc)

    def _inject(
        self,
        headers: MutableMapping[str, Any],
        facts: Mapping[str, Any],
        publish: _Publish | None,
    ) -> None:
        # Our publish span's context (current or not, see _open); else the caller's.
        ctx = publish.context if publish is not None else None
        if ctx is None:
            ctx = otel_context.get_current()
        textmap = propagate.get_global_textmap()
        fields = propagator_fields(textmap)
        # Injected into a dict of its own, so that we know which fields are ours: the
        # marker names them, and the worker reads those and no other (carrier.py).
        written: dict[str, str] = {}
        textmap.inject(written, context=ctx)
        baggage = written.get("baggage")
        if isinstance(baggage, str) and len(baggage) > self._options.max_baggage_bytes:
            self._bound_baggage(written, baggage)
        # A retry or replace republishes the previous message's headers: that stale
        # context goes, so nothing of the old one survives; Sentry's and Datadog's
        # headers stay (write_context). Without our marker, a field already there is
        # replaced only by a valid context. (A loop over the few fields, not
        # fields.isdisjoint(headers), which walks every header.)
        if CONTEXT_HEADER in headers:
            write_context(headers, written, fields, False)  # the marker names the stale
        else:
            for name in fields:
                if name in headers:
                    replaces = trace.get_current_span(ctx).get_span_context().is_valid
                    write_context(headers, written, fields, replaces)
                    break
            else:  # a first publish, the usual one: nothing stale to look for
                headers.update(written)
                headers[CONTEXT_HEADER] = " ".join(written)
        headers[SENT_AT_HEADER] = f"{time.time():.6f}"
        entry = _beat_entry.get()
        if entry is not None:
            headers[ENTRY_HEADER] = entry
        if scoped.used:  # one global read per publish until trace_shape() is first used
            shape = scoped.current()
            if shape is not None:
                headers[TRACE_SHAPE_HEADER] = shape
        source = publishing_from()
        if source is not None:
            self._inject_relations(headers, facts, *source)

    @staticmethod
    def _inject_relations(
        headers: MutableMapping[str, Any],
        facts: Mapping[str, Any],
        task_id: str,
        attempt: SpanContext | None,
        chord: ChordPart | None,
    ) -> None:
        """What a message published from inside a task needs to say about that task."""
        message_id = facts.get("id")
        if message_id == task_id and attempt is not None:
            headers[PREVIOUS_ATTEMPT_HEADER] = span_ref(attempt)
        if chord is not None and (
            message_id in chord.body_ids or facts.get("group") in chord.body_ids
        ):
            links = fanin.collect(chord)
            if links is not None:
                headers[fanin.CHORD_LINKS_HEADER] = links

    def _bound_baggage(self, headers: dict[str, str], baggage: str) -> None:
        bounded, dropped = bound_baggage(baggage, self._options.max_baggage_bytes)
        if bounded:
            headers["baggage"] = bounded
        else:
            headers.pop("baggage", None)
        if dropped and not self._baggage_warned:
            self._baggage_warned = True
            logger.warning(
                "otel-celery-headers: baggage of %d bytes exceeds max_baggage_bytes=%d; "
                "dropped %d member(s) from the end (logged once)",
                len(baggage.encode("utf-8")),
                self._options.max_baggage_bytes,
                dropped,
            )
