"""Marking a span failed, the same way on both sides."""

from __future__ import annotations

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
