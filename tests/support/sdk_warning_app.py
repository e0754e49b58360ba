"""A process that instruments Celery, then publishes and runs 3 tasks on a solo worker.

``python -m tests.support.sdk_warning_app <broker url> <mode>``, where mode is how the
SDK is set up: ``none`` (never), ``after`` (a TracerProvider set after instrument(),
as opentelemetry-instrument's distro may do) or ``explicit`` (passed to instrument(),
the global left unset). Prints ``results: ...`` on stdout; logs go to stderr.
"""

from __future__ import annotations

import logging
import sys

from celery import Celery
from celery.contrib.testing.worker import start_worker
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from otel_celery_headers import CeleryHeadersInstrumentor


def main(broker: str, mode: str) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
    provider = TracerProvider()
    CeleryHeadersInstrumentor().instrument(
        tracer_provider=provider if mode == "explicit" else None
    )
    if mode == "after":
        trace.set_tracer_provider(provider)

    app = Celery("sdkwarn", broker=broker, backend=broker, set_as_current=False)
    app.conf.update(broker_connection_retry_on_startup=True, worker_hijack_root_logger=False)

    @app.task(name="sdkwarn.double")
    def double(x: int) -> int:
        return 2 * x

    with start_worker(app, pool="solo", perform_ping_check=False, loglevel="WARNING",
                      shutdown_timeout=30):
        results = [double.delay(i).get(timeout=30) for i in range(3)]
    print("results:", results)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
