"""What the Train tab uses: start a run as a subprocess, watch it, cancel it, list runs.

``start_run`` validates the config, creates the run folder, writes its ``config.json`` and
starts ``python -m studio train <run>/config.json`` (or ``--resume``), holding ``studio.jobs.GPU``
for as long as the process lives. Status comes from the run folder alone (``events.jsonl``,
checkpoints, the output file), so runs started in an earlier session are listed too.
``cancel_run`` writes a ``cancel`` request file and sends SIGTERM: the trainer saves a checkpoint
and the adapter so far, then exits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from studio.errors import StudioError
from studio.train.engine import CANCEL_FILE

ROOT = Path(__file__).resolve().parents[2]
_LIVE: dict[str, "RunHandle"] = {}


@dataclass
class RunHandle:
    run_dir: Path
    proc: subprocess.Popen
    log_path: Path
    started: float = field(default_factory=time.time)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout)


@dataclass
class RunStatus:
    run_dir: Path
    state: str  # running | done | cancelled | error | interrupted | new
    step: int = 0
    max_steps: int = 0
    loss: float | None = None
    it_per_s: float | None = None
    output: str | None = None
    error: str | None = None
    fix: str | None = None
    samples: list[str] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    method: str = ""
    family: str = ""


def start_run(config: dict | str | Path | None = None, preset: str | None = None, sets: list | dict | None = None,
              resume: str | Path | None = None, wait_for_gpu: bool = False, extra_env: dict | None = None,
              job=None) -> RunHandle:
    """Start a run (or resume one) in its own process; returns at once.

    ``job``: a ``GPU`` job the caller already holds (``studio.train.queue`` takes the gate first, then
    starts the run); it is released when the process ends, or here if the start fails."""
    from studio.fileio import atomic_write_json
    from studio.jobs import GPU
    from studio.train.config import resolve_config
    from studio.train.engine import new_run_dir

    if resume:
        run_dir = Path(resume)
        if not (run_dir / "config.json").is_file():
            raise StudioError(f"{run_dir} is not a run folder.", "Pick a folder from the runs list.")
        args = ["--resume", str(run_dir)]
        for k, v in (sets.items() if isinstance(sets, dict) else []):
            args += ["--set", f"{k}={v}"]
    else:
        cfg = resolve_config(config, preset, sets)
        run_dir = new_run_dir(cfg)
        if (run_dir / "events.jsonl").exists():
            raise StudioError(f"{run_dir} already holds a run.", "Choose another output folder, or resume that run.")
        cfg.output_dir = str(run_dir)
        atomic_write_json(run_dir / "config.json", cfg.to_dict())
        args = [str(run_dir / "config.json")]
    if str(run_dir) in _LIVE and _LIVE[str(run_dir)].alive():
        raise StudioError(f"{run_dir.name} is already running.", "Wait for it or cancel it.")
    (run_dir / CANCEL_FILE).unlink(missing_ok=True)
    job = job or GPU.acquire("train", run_dir.name, wait=wait_for_gpu)
    log_path = run_dir / "train.log"
    try:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
        log = open(log_path, "ab")
        proc = subprocess.Popen([sys.executable, "-m", "studio", "train", *args, "--no-progress"], cwd=str(ROOT),
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
    except BaseException:
        GPU.release(job)
        raise
    handle = RunHandle(run_dir, proc, log_path)
    _LIVE[str(run_dir)] = handle

    def _release():
        proc.wait()
        GPU.release(job)

    threading.Thread(target=_release, daemon=True, name=f"train-{run_dir.name}").start()
    return handle


def cancel_run(run: RunHandle | str | Path, kill_after: float | None = None) -> None:
    """Ask a run to stop: it saves a checkpoint and the adapter so far, then exits."""
    run_dir = run.run_dir if isinstance(run, RunHandle) else Path(run)
    (run_dir / CANCEL_FILE).write_text("cancel requested\n")
    handle = run if isinstance(run, RunHandle) else _LIVE.get(str(run_dir))
    if handle is not None and handle.alive():
        handle.proc.send_signal(signal.SIGTERM)
        if kill_after is not None:
            try:
                handle.proc.wait(kill_after)
            except subprocess.TimeoutExpired:
                handle.proc.kill()


def read_status(run_dir: str | Path, events: list[dict] | None = None) -> RunStatus:
    """The run's state from its folder; ``events``: its events.jsonl already read (the Train tab's cache)."""
    from studio.train.checkpoint import list_checkpoints
    from studio.train.events import read_events

    run_dir = Path(run_dir)
    if events is None:
        events = read_events(run_dir / "events.jsonl")
    st = RunStatus(run_dir, "new" if not events else "interrupted")
    for e in events:
        t = e["type"]
        if t == "start":
            st.max_steps, st.method, st.family = e.get("max_train_steps", 0), e.get("method", ""), e.get("family", "")
            st.step, st.state, st.error, st.fix = e.get("step", 0), "running", None, None
        elif t == "step":
            st.step, st.loss, st.it_per_s = e["step"], e.get("loss"), e.get("it_per_s")
        elif t == "sample":
            st.samples += e.get("paths", [])
        elif t == "done":
            st.state, st.output, st.step = ("cancelled" if e.get("cancelled") else "done"), e.get("output"), e["step"]
        elif t == "error":
            st.state, st.error, st.fix = "error", e.get("message"), e.get("fix")
    handle = _LIVE.get(str(run_dir))
    if st.state == "running" and (handle is None or not handle.alive()) and handle is not None:
        st.state = "interrupted"
    elif st.state == "running" and handle is None and not _pid_alive_hint(run_dir):
        st.state = "interrupted" if events else "new"
    st.checkpoints = [str(p) for p in list_checkpoints(run_dir)]
    return st


def _pid_alive_hint(run_dir: Path) -> bool:
    """A run started by another process: treat it as live while its log is being written."""
    log = run_dir / "train.log"
    events = run_dir / "events.jsonl"
    newest = max((p.stat().st_mtime for p in (log, events) if p.exists()), default=0)
    return time.time() - newest < 120


def list_runs(runs_root: str | Path | None = None) -> list[RunStatus]:
    if runs_root is None:
        from studio.places import Settings, Workspace

        runs_root = Workspace(Settings.load().workspace_path()).runs
    root = Path(runs_root)
    if not root.is_dir():
        return []
    runs = [read_status(p) for p in root.iterdir() if p.is_dir() and (p / "config.json").exists()]
    return sorted(runs, key=lambda r: (r.run_dir / "config.json").stat().st_mtime, reverse=True)
