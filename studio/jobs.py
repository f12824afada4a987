"""One GPU job at a time.

Training, generation, captioning and merging all want the GPU; two at once would run both out of
memory. Every such job takes ``GPU.job(kind, label)``: a second job waits its turn (FIFO) or, with
``wait=False``, is refused with a message that says what is running. Training runs in its own
process, so its runner holds the gate for as long as that process lives. ``GPU.status()`` is what
the UI shows ("GPU busy: training run foo").
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from dataclasses import dataclass, field

from studio.errors import StudioError


@dataclass
class Job:
    id: int
    kind: str  # train | generate | caption | merge
    label: str
    started: float = field(default_factory=time.time)


class GpuGate:
    def __init__(self):
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._queue: list[Job] = []  # waiting, in arrival order
        self.current: Job | None = None

    def acquire(self, kind: str, label: str = "", wait: bool = True, timeout: float | None = None) -> Job:
        job = Job(next(self._ids), kind, label or kind)
        with self._cond:
            if self.current is not None and not wait:
                raise StudioError(f"The GPU is busy: {self.describe(self.current)}.",
                                  "Wait for it to finish, or cancel it first.")
            self._queue.append(job)
            ok = self._cond.wait_for(lambda: self.current is None and self._queue[0] is job, timeout)
            if not ok:
                self._queue.remove(job)
                self._cond.notify_all()
                raise StudioError(f"Timed out waiting for the GPU ({self.describe(self.current)}).",
                                  "Try again when it is free.")
            self._queue.pop(0)
            self.current = job
            return job

    def release(self, job: Job) -> None:
        with self._cond:
            if self.current is job:
                self.current = None
                self._cond.notify_all()

    @contextlib.contextmanager
    def job(self, kind: str, label: str = "", wait: bool = True, timeout: float | None = None):
        j = self.acquire(kind, label, wait, timeout)
        try:
            yield j
        finally:
            self.release(j)

    @staticmethod
    def describe(job: Job | None) -> str:
        if job is None:
            return "idle"
        return f"{job.kind} '{job.label}' running for {int(time.time() - job.started)} s"

    def status(self) -> dict:
        with self._cond:
            return {"busy": self.current is not None, "current": self.describe(self.current),
                    "kind": self.current.kind if self.current else None,
                    "queued": [f"{j.kind} '{j.label}'" for j in self._queue]}


GPU = GpuGate()
