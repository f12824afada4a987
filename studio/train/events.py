"""``events.jsonl``: the run's append-only log, one JSON object per line, read by the UI.

Types: ``start``, ``step`` (step, loss, lr, it_per_s, memory), ``sample`` (paths),
``checkpoint`` (path), ``done`` (output path), ``error`` (message, fix), plus ``info``/``warning``.
Each line is written with a single ``write()`` on an O_APPEND descriptor and fsynced, so a kill
leaves whole lines; the reader still tolerates (and the writer repairs) a torn last line.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Iterator

EVENTS_FILE = "events.jsonl"


class EventWriter:
    def __init__(self, path: str | os.PathLike, enabled: bool = True, fsync: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self.fsync = fsync
        self._fd = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _repair(self.path)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def emit(self, type: str, **fields) -> dict:
        event = {"type": type, "time": round(time.time(), 3), **fields}
        if self._fd is not None:
            line = (json.dumps(event, default=str) + "\n").encode("utf-8")
            os.write(self._fd, line)
            if self.fsync:
                os.fsync(self._fd)
        return event

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _repair(path: Path) -> None:
    """Drop a torn (unterminated) last line left by a kill, so new lines start clean."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    with open(path, "r+b") as fh:
        fh.truncate(cut)
        os.fsync(fh.fileno())


def read_events(path: str | os.PathLike) -> list[dict]:
    return list(iter_events(path))


def iter_events(path: str | os.PathLike, offset: int = 0) -> Iterator[dict]:
    """Every whole, valid event line; a torn or garbled line is skipped, never raised."""
    p = Path(path)
    if not p.exists():
        return
    with open(p, "rb") as fh:
        fh.seek(offset)
        for raw in fh:
            if not raw.endswith(b"\n"):
                break  # torn last line: still being written, or the writer was killed
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            if isinstance(event, dict) and "type" in event:
                yield event


class EventTail:
    """Incremental reader for the UI: ``poll()`` returns only the events added since last time."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.offset = 0

    def poll(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            for raw in fh:
                if not raw.endswith(b"\n"):
                    break
                self.offset += len(raw)
                try:
                    event = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(event, dict) and "type" in event:
                    out.append(event)
        return out
