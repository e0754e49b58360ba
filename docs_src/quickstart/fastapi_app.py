import os

from celery import Celery
from fastapi import FastAPI

celery_app = Celery("shop", broker=os.environ.get("CELERY_BROKER_URL", "redis://localhost:6379/0"))
api = FastAPI()


@celery_app.task(name="send_receipt")
def send_receipt(order_id: int) -> str:
    return f"receipt for order {order_id}"


@api.post("/orders/{order_id}")
def create_order(order_id: int) -> dict[str, int]:
    send_receipt.delay(order_id)
    return {"queued": order_id}
