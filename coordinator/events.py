"""Run progress as JSON Lines events (``runs/<run-id>/events.jsonl``).

The ServerApp appends events; the coordinator's CLI follows the file and renders a live display.
Events hold counts, ε and metrics - never data values.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class EventLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, kind: str, **fields: Any) -> None:
        record = {"t": round(time.time(), 3), "kind": kind, **fields}
        line = json.dumps(record, default=_jsonable) + "\n"
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def read_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line still being written
    return out


def follow(path: Path, *, poll: float = 0.2, stop: Any = None) -> Iterator[dict[str, Any]]:
    """Yield events as they are appended until ``stop()`` is true and the file is drained."""
    offset = 0
    buf = ""
    while True:
        if path.exists():
            with path.open("r", encoding="utf-8") as fh:
                fh.seek(offset)
                chunk = fh.read()
                offset = fh.tell()
            buf += chunk
            while "\n" in buf:
                line, buf = buf.split("\n", 1)
                if line.strip():
                    yield json.loads(line)
        if stop is not None and stop():
            return
        time.sleep(poll)
