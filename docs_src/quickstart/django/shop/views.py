from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from shop.tasks import send_receipt


@csrf_exempt
@require_POST
def create_order(request: HttpRequest, order_id: int) -> JsonResponse:
    send_receipt.delay(order_id)
    return JsonResponse({"queued": order_id})
