"""A Flask app factory with its Celery app: ``flask --app shop run``."""

import os

from celery import Celery, Task
from flask import Flask


def create_app() -> Flask:
    app = Flask(__name__)
    app.config.from_mapping(
        # Flask's usual layout: Celery's settings under one key of the Flask config.
        CELERY={
            "broker_url": os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0"),
            "task_default_queue": "receipts",
            "task_ignore_result": True,
        },
        RECEIPT_SENDER=os.environ.get("RECEIPT_SENDER", "shop@example.com"),
    )
    celery_init_app(app)

    from .views import bp

    app.register_blueprint(bp)
    return app


def celery_init_app(app: Flask) -> Celery:
    """A Celery app configured from ``app.config["CELERY"]`` whose tasks run inside
    the Flask application context (so they can read ``current_app.config``, use
    extensions...), made the default app so ``@shared_task`` binds to it."""

    class AppContextTask(Task):
        def __call__(self, *args: object, **kwargs: object) -> object:
            with app.app_context():
                return self.run(*args, **kwargs)

    celery_app = Celery(app.name, task_cls=AppContextTask)
    celery_app.config_from_object(app.config["CELERY"])
    celery_app.set_default()
    app.extensions["celery"] = celery_app
    return celery_app
