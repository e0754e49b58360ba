"""The task: no tracing code; the worker runs under opentelemetry-instrument."""

from celery import shared_task
from flask import current_app


@shared_task
def send_receipt(email: str, total: float) -> str:
    # Inside the Flask app context (celery_init_app's task class).
    sender = current_app.config["RECEIPT_SENDER"]
    return f"receipt for {total:.2f} from {sender} to {email}"
