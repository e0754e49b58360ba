from django.urls import path

from shop.views import create_order

urlpatterns = [path("orders/<int:order_id>", create_order)]
