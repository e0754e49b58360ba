"""Outcomes, the same way on both sides: marking a span failed, and what is not a failure."""

from __future__ import annotations

from typing import Any

from opentelemetry.trace import Span, Status, StatusCode

from .attributes import ERROR_TYPE


def error_type(exc: BaseException) -> str:
    """Fully qualified exception class name, as ``error.type`` asks for."""
    cls = type(exc)
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


def mark_failed(span: Span, exc: BaseException) -> None:
    # escaped: the exception left the publish or the task body (it reaches the caller).
    span.record_exception(exc, escaped=True)
    span.set_attribute(ERROR_TYPE, error_type(exc))
    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))


def unwrap(exc: BaseException) -> BaseException:
    """billiard wraps exceptions crossing the pool pipe in ExceptionWithTraceback."""
    inner = getattr(exc, "exc", None)
    if type(exc).__name__ == "ExceptionWithTraceback" and isinstance(inner, BaseException):
        return inner
    return exc


def is_expected(task: Any, exc: BaseException) -> bool:
    throws = getattr(task, "throws", None) or ()
    try:
        return bool(throws) and isinstance(exc, tuple(throws))
    except TypeError:
        return False


