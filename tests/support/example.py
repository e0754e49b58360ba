"""The demo's standalone modules (examples/fastapi_celery), loaded by path."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fastapi_celery"


def load(name: str) -> ModuleType:
    """``examples/fastapi_celery/<name>.py`` as module ``name``, once per session.

    By path, not through sys.path: the example's api/db/tasks modules must not
    shadow anything for the rest of the test session."""
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, EXAMPLE / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module
