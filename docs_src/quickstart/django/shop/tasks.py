from celery import shared_task


@shared_task(name="send_receipt")
def send_receipt(order_id: int) -> str:
    return f"receipt for order {order_id}"
