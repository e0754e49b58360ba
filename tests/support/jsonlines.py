"""Reading the JSON-lines files our test exporters append to from other processes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json_lines(path: str | Path) -> list[dict[str, Any]]:
    """The complete lines of ``path``, parsed; none if it does not exist yet.

    A writer (a worker's exporter, one ``os.write`` per batch) may be half way through a
    batch while a test polls the file: the bytes after the last newline are a line still
    being written, and are left for the next read (a JSONDecodeError there was a flake).
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    complete = data[: data.rfind(b"\n") + 1]
    return [json.loads(line) for line in complete.decode().splitlines() if line.strip()]
