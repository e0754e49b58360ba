"""The worker side: process an order, then queue a notification.

Run: opentelemetry-instrument celery -A tasks worker --pool prefork --concurrency 2
(no tracing code here either)
"""

from __future__ import annotations

import logging
import os

from celery import Celery
from celery.signals import worker_process_init

from db import Order, Session, engine

logger = logging.getLogger(__name__)

app = Celery("orders", broker=os.environ.get("BROKER_URL", "redis://127.0.0.1:6379/0"))
app.conf.update(
    # Its own queue, so that pointed at a shared broker (BROKER_URL) the demo neither
    # takes other applications' tasks nor has its own taken.
    task_default_queue="orders-demo",
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
)


class PaymentDeclined(Exception):
    pass


@worker_process_init.connect
def _fresh_db_connections(**_):
    # Each prefork child opens its own connections, never the parent's.
    engine.dispose(close=False)


@app.task(name="process_order")
def process_order(order_id: int, fail: bool = False) -> str:
    with Session() as session:
        order = session.get(Order, order_id)
        order.status = "processing"
        session.commit()
        if fail:
            order.status = "payment_declined"
            session.commit()
            raise PaymentDeclined(f"card declined for order {order_id}")
        order.status = "paid"
        session.commit()
    notify.delay(order_id)
    return "paid"


@app.task(name="notify")
def notify(order_id: int) -> None:
    with Session() as session:
        order = session.get(Order, order_id)
        logger.info("order %s (%s x %s) is on its way", order.id, order.quantity, order.item)
        order.status = "notified"
        session.commit()
