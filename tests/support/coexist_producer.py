"""The coexistence tests' producer: ``python -m tests.support.coexist_producer OUT``.

Initialises like the worker (tests/support/coexist_app.py), then, for a delay, a chain
of 2, a group of 3 and a task that retries once, each with and without caller baggage, publishes inside a web
request's transaction of the vendor (a Sentry transaction, a ddtrace span) and an
OpenTelemetry span; waits for the results and writes them, with the root spans' ids,
to OUT as JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

from celery import chain, group
from opentelemetry import baggage, context, trace

from tests.support.coexist_app import app, provider, report, retry_report

TIMEOUT = 60


@contextlib.contextmanager
def web_request(name: str) -> Iterator[dict[str, Any]]:
    """The vendor's view of an incoming web request, as its web integration would open it."""
    vendor = os.environ.get("VENDOR", "none")
    facts: dict[str, Any] = {}
    if vendor == "sentry":
        import sentry_sdk

        with sentry_sdk.start_transaction(op="http.server", name=name) as transaction:
            facts["sentry_trace_id"] = transaction.trace_id
            yield facts
    elif vendor == "ddtrace":
        from ddtrace.trace import tracer

        with tracer.trace("web.request", resource=name) as span:
            facts["dd_trace_id"] = span.trace_id
            yield facts
    else:
        yield facts


def run(shape: str, with_baggage: bool) -> dict[str, Any]:
    name = f"request {shape}{' baggage' if with_baggage else ''}"
    tracer = trace.get_tracer("coexist.producer")
    token = context.attach(baggage.set_baggage("tenant", "acme")) if with_baggage else None
    try:
        with web_request(name) as facts, tracer.start_as_current_span(name) as root:
            if shape == "delay":
                results = [report.delay()]
            elif shape == "chain":
                last = chain(report.si(), report.si()).apply_async()
                results = [last.parent, last]
            elif shape == "group":
                results = list(group(report.si() for _ in range(3)).apply_async().results)
            else:
                results = [retry_report.delay()]
    finally:
        if token is not None:
            context.detach(token)
    ctx = root.get_span_context()
    return {
        "shape": shape, "baggage": with_baggage, "root": name, **facts,
        "trace_id": f"{ctx.trace_id:032x}", "span_id": f"{ctx.span_id:016x}",
        "reports": [r.get(timeout=TIMEOUT) for r in results],
    }


def main(out: str) -> None:
    runs = [run(shape, with_baggage) for shape in ("delay", "chain", "group", "retry") for with_baggage in (False, True)]
    provider.force_flush()
    if os.environ.get("VENDOR") == "sentry":
        import sentry_sdk

        sentry_sdk.flush(timeout=10)
    elif os.environ.get("VENDOR") == "ddtrace":
        from ddtrace.trace import tracer

        tracer.flush()
    with open(out, "w") as f:
        json.dump(runs, f)
    app.close()


if __name__ == "__main__":
    main(sys.argv[1])
