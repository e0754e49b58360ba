"""A small JSON API: ``POST /orders/`` saves an order and queues its processing."""

import json

from django.http import HttpRequest, JsonResponse
from django.shortcuts import get_object_or_404
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from .models import Order
from .tasks import process_order


@csrf_exempt  # an API called by other programs, not a form in a browser
@require_POST
def create_order(request: HttpRequest) -> JsonResponse:
    try:
        body = json.loads(request.body or b"{}")
        item, quantity = str(body["item"]), int(body.get("quantity", 1))
    except (ValueError, KeyError, TypeError):
        return JsonResponse({"error": 'expected {"item": str, "quantity": int}'}, status=400)
    # Autocommit (no ATOMIC_REQUESTS): the row is committed when create() returns, so
    # the worker finds it. Inside transaction.atomic(), publish from
    # transaction.on_commit() instead.
    order = Order.objects.create(item=item, quantity=quantity)  # INSERT
    result = process_order.delay(order.pk)
    return JsonResponse({"id": order.pk, "status": order.status, "task_id": result.id},
                        status=202)


@require_GET
def order_detail(request: HttpRequest, pk: int) -> JsonResponse:
    order = get_object_or_404(Order, pk=pk)
    return JsonResponse({"id": order.pk, "item": order.item, "quantity": order.quantity,
                         "status": order.status})
