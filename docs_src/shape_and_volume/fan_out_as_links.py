import os

from celery import Celery, group

from otel_celery_headers import trace_shape

app = Celery("images", broker=os.environ.get("CELERY_BROKER_URL", "redis://localhost:6379/0"))


@app.task(name="images.resize")
def resize(image_id: int) -> None:
    ...  # resize one image


def resize_all(ids: list[int]) -> None:
    with trace_shape("link"):
        group(resize.s(image_id) for image_id in ids).delay()
