"""``POST /receipts`` queues a receipt e-mail and answers at once."""

from flask import Blueprint, jsonify, request
from flask.typing import ResponseReturnValue

from .tasks import send_receipt

bp = Blueprint("receipts", __name__)


@bp.post("/receipts")
def queue_receipt() -> ResponseReturnValue:
    body = request.get_json(silent=True) or {}
    try:
        email, total = str(body["email"]), float(body["total"])
    except (KeyError, TypeError, ValueError):
        return jsonify(error='expected {"email": str, "total": number}'), 400
    result = send_receipt.delay(email, total)
    return jsonify(task_id=result.id), 202
