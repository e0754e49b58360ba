from celery import Celery
from celery.signals import worker_process_init

from otel_celery_headers import CeleryHeadersInstrumentor

app = Celery("proj")


@worker_process_init.connect(weak=False)
def instrument_pool_child(**_: object) -> None:
    # Each pool child, after its fork: the main process stays uninstrumented.
    CeleryHeadersInstrumentor().instrument()
