"""The web side: take an order, store it, hand the slow part to a Celery task.

Run: python db.py  (creates the table, once)
     opentelemetry-instrument uvicorn api:app
(no tracing code here: the FastAPI and SQLAlchemy instrumentations and
otel-celery-headers do it all)
"""

from __future__ import annotations

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from db import Order, Session
from tasks import process_order

app = FastAPI(title="orders")


class NewOrder(BaseModel):
    item: str
    quantity: int = 1
    # Makes the payment step of the task fail, to see an error in the trace.
    fail: bool = False


@app.post("/orders", status_code=202)
def create_order(new: NewOrder) -> dict:
    with Session() as session:
        order = Order(item=new.item, quantity=new.quantity, status="received")
        session.add(order)
        session.commit()
        order_id = order.id
    process_order.delay(order_id, fail=new.fail)
    return {"id": order_id, "status": "received"}


@app.get("/orders/{order_id}")
def get_order(order_id: int) -> dict:
    with Session() as session:
        order = session.get(Order, order_id)
        if order is None:
            raise HTTPException(404, "no such order")
        return {"id": order.id, "item": order.item, "status": order.status}
