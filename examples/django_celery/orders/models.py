from django.db import models


class Order(models.Model):
    class Status(models.TextChoices):
        PLACED = "placed"
        PROCESSED = "processed"
        NOTIFIED = "notified"

    item = models.CharField(max_length=200)
    quantity = models.PositiveIntegerField(default=1)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.PLACED)
    created = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"order {self.pk}: {self.quantity} x {self.item} ({self.status})"
