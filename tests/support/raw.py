"""Publish a Celery protocol-2 message by hand, with exactly the headers given."""

from __future__ import annotations

import uuid
from typing import Any

from celery import Celery


def publish_raw(
    app: Celery, name: str, args: tuple[Any, ...] = (), headers: dict[str, Any] | None = None,
    queue: str = "celery",
) -> str:
    task_id = str(uuid.uuid4())
    message_headers: dict[str, Any] = {
        "lang": "py", "task": name, "id": task_id, "shadow": None, "eta": None,
        "expires": None, "group": None, "group_index": None, "retries": 0,
        "timelimit": [None, None], "root_id": task_id, "parent_id": None,
        "argsrepr": repr(args), "kwargsrepr": "{}", "origin": "tests", "ignore_result": False,
    }
    message_headers.update(headers or {})
    body = (list(args), {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None})
    with app.connection_for_write() as conn:
        producer = conn.Producer(serializer="json")
        producer.publish(
            body, routing_key=queue, exchange="", headers=message_headers,
            declare=[app.amqp.queues[queue]] if queue in app.amqp.queues else None,
        )
    return task_id
