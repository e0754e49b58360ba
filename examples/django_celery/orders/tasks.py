"""The tasks: no tracing code here either; the worker runs under opentelemetry-instrument."""

from celery import shared_task

from .models import Order


@shared_task
def process_order(order_id: int) -> str:
    order = Order.objects.get(pk=order_id)  # SELECT
    order.status = Order.Status.PROCESSED
    order.save(update_fields=["status"])  # UPDATE
    # Published from inside this task: the follow-up joins the request's trace.
    notify_customer.delay(order.pk)
    return order.status


@shared_task
def notify_customer(order_id: int) -> int:
    # One UPDATE, no SELECT: the task only needs the id.
    return Order.objects.filter(pk=order_id).update(status=Order.Status.NOTIFIED)
