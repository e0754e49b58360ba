"""What making a delivery's context current costs the worker's main process, per task.

With log correlation on (logcontext.py), every delivery pays in the main process: the
strategy's handler reads the producer's span from the message's traceparent and keeps
it on the message, attaches and detaches it; ``Request.on_accepted`` attaches and
detaches it again (the stash is hit, no second parse). Off, the strategy is Celery's own
and nothing is paid. This times, in one process and in alternating rounds, Celery's
"Task ... received" line (a logger with opentelemetry-instrumentation-logging's record
factory, to a null stream) alone, and the same line inside our two wrappers, over
real kombu messages whose headers our producer injected. Reported: the median extra
microseconds per delivery, and as a ratio of the line itself.

    python benchmarks/log_correlation.py [--deliveries 20000 --rounds 15]
"""

from __future__ import annotations

import argparse
import gc
import io
import logging
import statistics
import time
from types import SimpleNamespace
from typing import Any

from kombu import Message
from opentelemetry import propagate
from opentelemetry.instrumentation.logging import LoggingInstrumentor
from opentelemetry.sdk.trace import TracerProvider

from otel_celery_headers import logcontext, quiet
from otel_celery_headers.carrier import propagator_fields, write_context
from otel_celery_headers.options import Options

FORMAT = "trace=%(otelTraceID)s span=%(otelSpanID)s | %(message)s"


def _messages(count: int) -> list[Any]:
    tracer = TracerProvider().get_tracer("bench")
    out = []
    for index in range(count):
        headers: dict[str, Any] = {"task": "t.add", "id": f"id-{index}"}
        with tracer.start_as_current_span("send t.add"):
            # As producer.py writes it: the fields, and the marker naming them.
            written: dict[str, str] = {}
            propagate.inject(written)
            textmap = propagate.get_global_textmap()
            write_context(headers, written, propagator_fields(textmap), False)
        out.append(Message(body=b"[]", headers=headers))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deliveries", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=15)
    options = parser.parse_args()
    LoggingInstrumentor().instrument(inject_trace_context=True, enable_log_auto_instrumentation=False)
    log = logging.getLogger("bench.strategy")
    log.propagate = False
    handler = logging.StreamHandler(io.StringIO())
    handler.setFormatter(logging.Formatter(FORMAT))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    task = SimpleNamespace(name="t.add")
    accepted_logged = logging.getLogger("celery.worker.request").isEnabledFor(logging.DEBUG)

    def received(message: Any, *rest: Any) -> None:  # Celery's line, nothing else
        log.info("Task %s[%s] received", "t.add", message.headers["id"])

    context = logcontext.LogContext(Options())
    wrapped = context.wrap_strategy(lambda *a, **k: received, None, (task,), {})
    assert context.on, "the record factory is installed: log context must be on"

    def delivery(handler_of: Any, message: Any) -> None:
        handler_of(message, None, None, None, None)
        if handler_of is received:
            return
        request = SimpleNamespace(_message=message, task=task, request_dict=message.headers)
        # on_accepted: Celery's "Task accepted" line is DEBUG; deliveries.py enters the
        # context there only when that is enabled (or a revoke waits for the ack).
        if accepted_logged:
            token = context.enter_request(request)
            if token is not None:
                logcontext.otel_context.detach(token)

    def per_delivery(handler_of: Any) -> float:
        messages = _messages(options.deliveries)  # fresh: no stash from an earlier round
        start = time.thread_time_ns()
        for message in messages:
            delivery(handler_of, message)
        return (time.thread_time_ns() - start) / options.deliveries / 1000

    def parse_only() -> float:  # what reading the producer's span costs alone
        messages = _messages(options.deliveries)
        start = time.thread_time_ns()
        for message in messages:
            logcontext.message_span(message)
        return (time.thread_time_ns() - start) / options.deliveries / 1000

    rows: list[tuple[float, float, float]] = []
    # As in a worker: its consumer loop runs quiet (quiet.py, suppress_broker_traffic),
    # and the context made current for a delivery keeps that.
    loop = logcontext.otel_context.attach(quiet.quieted())
    gc.disable()
    try:
        for index in range(options.rounds + 1):
            plain, ours, parse = per_delivery(received), per_delivery(wrapped), parse_only()
            if index:  # the first round warms up
                rows.append((plain, ours, parse))
    finally:
        gc.enable()
        logcontext.otel_context.detach(loop)
    plain = statistics.median(r[0] for r in rows)
    extra = statistics.median(r[1] - r[0] for r in rows)
    parse = statistics.median(r[2] for r in rows)
    print(f"received line alone:        {plain:.2f} us per delivery")
    print(f"our context (strategy + on_accepted): +{extra:.2f} us per delivery "
          f"({extra / plain:.2f}x the line)")
    print(f"  of which the header parse: {parse:.2f} us ({parse / extra:.2f} of it; "
          "shared with the metrics when a MeterProvider is set)")


if __name__ == "__main__":
    main()
