"""Training runs waiting for the GPU: a second Start while a run (or any GPU job) is active is queued
and starts by itself when the GPU gate frees, in arrival order.

A queued run already has its folder and ``config.json`` (so it is listed and can be cancelled);
it gets its ``events.jsonl`` when it starts. The queue lives in the studio's process: it is lost if
the studio is closed, and such a run is then shown as never started (Resume or Start it again).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from studio.errors import StudioError


@dataclass
class Pending:
    run_dir: Path
    config: dict | None = None  # a new run's resolved config (with output_dir)
    resume: bool = False
    sets: dict = field(default_factory=dict)
    extra_env: dict | None = None


@dataclass
class Submitted:
    run_dir: Path
    queued: bool
    position: int = 0  # 1 = next to start
    handle: object = None  # runner.RunHandle when started at once


class TrainQueue:
    def __init__(self):
        self._lock = threading.Lock()
        self._pending: list[Pending] = []
        self._worker: threading.Thread | None = None
        self.errors: dict[str, StudioError] = {}  # run folder -> why a queued run could not start

    # ---- submit / cancel -------------------------------------------------------------------
    def submit(self, config: dict | None = None, resume: str | Path | None = None, sets: dict | None = None,
               extra_env: dict | None = None) -> Submitted:
        """Start now if the GPU is free and nobody waits, else queue. Config errors raise here, at once."""
        from studio.jobs import GPU
        from studio.train import runner

        if resume:
            run_dir = Path(resume)
            if not (run_dir / "config.json").is_file():
                raise StudioError(f"{run_dir} is not a run folder.", "Pick a run from the history.")
            item = Pending(run_dir, resume=True, sets=dict(sets or {}), extra_env=extra_env)
        else:
            item = Pending(*self._prepare(config or {}, sets), extra_env=extra_env)
        with self._lock:
            if self.position(item.run_dir) or (str(item.run_dir) in runner._LIVE and runner._LIVE[str(item.run_dir)].alive()):
                raise StudioError(f"{item.run_dir.name} is already running or queued.", "Wait for it or cancel it.")
            if not self._pending and not GPU.status()["busy"]:
                try:
                    job = GPU.acquire("train", item.run_dir.name, wait=False)
                except StudioError:
                    job = None  # taken in between: queue it
                if job is not None:
                    return Submitted(item.run_dir, False, 0, self._start(item, job))
            self._pending.append(item)
            position = len(self._pending)
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._work, daemon=True, name="train-queue")
                self._worker.start()
        return Submitted(item.run_dir, True, position)

    def cancel(self, run_dir: str | Path) -> bool:
        """Take a waiting run off the queue (its never-used folder is removed). False if not queued."""
        run_dir = Path(run_dir)
        with self._lock:
            for item in self._pending:
                if item.run_dir == run_dir:
                    self._pending.remove(item)
                    break
            else:
                return False
        if not item.resume:
            _remove_unstarted(run_dir)
        return True

    def position(self, run_dir: str | Path) -> int:
        """1-based place in the queue, 0 when not queued."""
        run_dir = Path(run_dir)
        for i, item in enumerate(list(self._pending), 1):
            if item.run_dir == run_dir:
                return i
        return 0

    def pending(self) -> list[Path]:
        return [i.run_dir for i in list(self._pending)]

    # ---- internals -----------------------------------------------------------------------
    @staticmethod
    def _prepare(config: dict, sets: dict | None) -> tuple[Path, dict]:
        """Resolve and validate the config, pick a fresh run folder and write its config.json."""
        from studio.fileio import atomic_write_json
        from studio.train.config import resolve_config
        from studio.train.engine import new_run_dir

        cfg = resolve_config(dict(config), None, sets or {})
        run_dir = new_run_dir(cfg)
        if run_dir.exists() and any(run_dir.iterdir()) and not cfg.output_dir:
            base, n = run_dir, 2  # two starts in the same second: runs/name-TIME-2
            while run_dir.exists():
                run_dir, n = base.with_name(f"{base.name}-{n}"), n + 1
        if (run_dir / "events.jsonl").exists():
            raise StudioError(f"{run_dir} already holds a run.", "Choose another output folder, or resume that run.")
        cfg.output_dir = str(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "config.json", cfg.to_dict())
        return run_dir, cfg.to_dict()

    @staticmethod
    def _start(item: Pending, job):
        from studio.jobs import GPU
        from studio.train import runner

        try:
            if item.resume:
                return runner.start_run(resume=item.run_dir, sets=item.sets, extra_env=item.extra_env, job=job)
            return runner.start_run(item.config, extra_env=item.extra_env, job=job)
        except BaseException:
            GPU.release(job)  # no-op when start_run already released it
            raise

    def _work(self) -> None:
        from studio.jobs import GPU

        while True:
            with self._lock:
                if not self._pending:
                    self._worker = None
                    return
                head = self._pending[0]
            job = GPU.acquire("train", head.run_dir.name, wait=True)
            with self._lock:
                if not self._pending or self._pending[0] is not head:  # cancelled while waiting
                    GPU.release(job)
                    continue
                self._pending.pop(0)
            try:
                self._start(head, job)
            except StudioError as err:
                self.errors[str(head.run_dir)] = err
                _record_error(head.run_dir, err)
            except Exception as err:  # keep the queue moving; the run shows the error
                wrapped = StudioError(f"The run could not start: {type(err).__name__}: {err}",
                                      "Check the log below, then Start it again.")
                self.errors[str(head.run_dir)] = wrapped
                _record_error(head.run_dir, wrapped)


def _record_error(run_dir: Path, err: StudioError) -> None:
    from studio.train.events import EVENTS_FILE, EventWriter

    with EventWriter(run_dir / EVENTS_FILE) as w:
        w.emit("error", message=err.message, fix=err.fix)


def _remove_unstarted(run_dir: Path) -> None:
    """Remove a run folder that holds nothing but its config.json (a queued run that never ran)."""
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {"config.json"}:
        (run_dir / "config.json").unlink(missing_ok=True)
        run_dir.rmdir()


QUEUE = TrainQueue()
