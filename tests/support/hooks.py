"""Hooks named by environment variables (``module:function``) in the tests.

Each one records that it ran and sets an attribute, so a test can see both.
"""

from __future__ import annotations

from typing import Any

CALLS: list[tuple[str, str]] = []


def publish_hook(span: Any, task_name: str, headers: Any) -> None:
    CALLS.append(("publish", task_name))
    span.set_attribute("test.publish_hook", task_name)


def process_hook(span: Any, task: Any) -> None:
    CALLS.append(("process", task.name))
    span.set_attribute("test.process_hook", task.name)
