import os

from celery import Celery
from flask import Flask

celery_app = Celery("shop", broker=os.environ.get("CELERY_BROKER_URL", "redis://localhost:6379/0"))
app = Flask(__name__)


@celery_app.task(name="send_receipt")
def send_receipt(order_id: int) -> str:
    return f"receipt for order {order_id}"


@app.post("/orders/<int:order_id>")
def create_order(order_id: int) -> dict[str, int]:
    send_receipt.delay(order_id)
    return {"queued": order_id}
