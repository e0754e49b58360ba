"""App module for `celery -A tests.support.worker_app worker` subprocesses.

Environment: BROKER_URL, SPAN_FILE (JSON lines), INSTRUMENT_AT ("import", the way
auto-instrumentation does it, before the fork; "worker_init", in the main process; or
"process_init", in each child),
OTLP_TRACES_URL (send spans over OTLP/HTTP there instead of to SPAN_FILE), METRIC_FILE
(metrics as JSON lines, every METRIC_INTERVAL_MS, see tests/support/metric_file.py),
QUEUE_LENGTH_URL (the broker our queue-length thread asks, see tests/test_health.py),
RESULT_BACKEND (instead of BROKER_URL), SPAN_DELAY_MS, DOCS_SAMPLE (a file under docs_src/
whose instrument() call replaces ours at import: tests/test_docs_samples.py).
Spans go through a BatchSpanProcessor with a one-minute delay (unless SPAN_DELAY_MS):
a span reaches the file only if the instrumentation flushes it before a pool child exits.
"""

from __future__ import annotations

import os
from typing import Any

from celery import signals

from otel_celery_headers import CeleryHeadersInstrumentor
from tests.support.subprocess_app import global_meter_provider, global_provider, subprocess_app
from tests.support.tasks import register

if os.environ.get("OTLP_TRACES_URL"):
    # The soak: spans over OTLP/HTTP to a receiver, every 5 s (the SDK's default).
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    global_provider("worker", 5_000, OTLPSpanExporter(endpoint=os.environ["OTLP_TRACES_URL"]))
else:
    global_provider("worker", schedule_delay_millis=int(os.environ.get("SPAN_DELAY_MS", "60000")))

global_meter_provider("worker")
app = subprocess_app("worker_app", task_protocol=int(os.environ.get("TASK_PROTOCOL", "2")))
if os.environ.get("RESULT_BACKEND"):
    app.conf.result_backend = os.environ["RESULT_BACKEND"]
tasks = register(app)

if os.environ.get("QUEUE_LENGTH_URL"):
    # tests/test_health.py: only our queue-length thread is sent to this broker.
    import threading

    _for_read = app.connection_for_read

    def _queue_length_broker(url: str | None = None, **kwargs: object) -> object:
        if threading.current_thread().name == "otel-celery-queue-length":
            url = os.environ["QUEUE_LENGTH_URL"]
        return _for_read(url, **kwargs)

    app.connection_for_read = _queue_length_broker

if os.environ.get("DOCS_SAMPLE"):
    import runpy

    runpy.run_path(os.environ["DOCS_SAMPLE"])
elif os.environ.get("INSTRUMENT_AT", "import") == "import":
    CeleryHeadersInstrumentor().instrument()
elif os.environ["INSTRUMENT_AT"] == "worker_init":  # main process, before the pool forks

    @signals.worker_init.connect(weak=False)
    def _instrument_at_worker_init(**_: object) -> None:
        CeleryHeadersInstrumentor().instrument()

else:

    @signals.worker_process_init.connect(weak=False)
    def _instrument_in_child(**_: object) -> None:
        CeleryHeadersInstrumentor().instrument()


@signals.task_postrun.connect(weak=False)
def _die_after_the_task(sender: object = None, **_: object) -> None:
    """t.finish_then_die: after our task_postrun receiver (connected earlier, by
    instrument() at import), once our flush has handed this process's spans to the
    exporter, the child is killed: a child lost after it ended the task's span."""
    if getattr(sender, "name", None) != "t.finish_then_die":
        return
    import signal
    import time

    from otel_celery_headers import endings

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not _all_flushed(endings):
        time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGKILL)


def _all_flushed(endings: object) -> bool:
    """Whether endings.py records every span this child ended as flushed (read from
    its table the way the main process reads it)."""
    e: Any = endings
    offset = e._mine[2] + e._RECORD.size
    return bool(e._FLUSHED.unpack_from(e._table, offset)[1] >= e.before_flush())
