"""What the Train tab shows about a run, read from the run folder alone (``events.jsonl``,
``train.log``, ``config.json``), so a browser refresh or a second browser sees the same thing.

``watch(run_dir)`` returns a ``RunView``: state, loss points (raw and smoothed), learning rate,
it/s, ETA, memory, preview images by step, the log tail and a readable error with its fix.
Events are read incrementally (only the new lines on each poll).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from studio.train.events import EVENTS_FILE, EventTail

SMOOTHING = 0.9  # TensorBoard's default: an exponential moving average, debiased at the start
MAX_PLOT_POINTS = 1500  # points per series sent to the browser
_CACHE: dict[str, tuple[EventTail, list[dict]]] = {}
_CACHE_LOCK = threading.Lock()


@dataclass
class RunView:
    run_dir: Path
    name: str
    state: str  # running | queued | done | cancelled | error | interrupted | new
    step: int = 0
    max_steps: int = 0
    loss_steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    lr: float | None = None
    it_per_s: float | None = None
    eta_s: float | None = None
    memory: str = ""
    samples: list[tuple[str, int]] = field(default_factory=list)  # (image path, step), oldest first
    output: str | None = None
    error: str | None = None
    fix: str | None = None
    log_tail: str = ""
    method: str = ""
    queue_position: int = 0
    started: float | None = None  # time of the first event
    ended: float | None = None  # time of the last done / error event
    eval_loss: float | None = None
    config: dict = field(default_factory=dict)

    @property
    def final_loss(self) -> float | None:
        return self.smoothed[-1] if self.smoothed else None

    @property
    def duration_s(self) -> float | None:
        if self.started is None:
            return None
        return (self.ended or time.time()) - self.started


def smooth(values: list[float], weight: float = SMOOTHING) -> list[float]:
    out, ema = [], 0.0
    for i, v in enumerate(values, 1):
        ema = weight * ema + (1 - weight) * v
        out.append(ema / (1 - weight ** i))
    return out


def events_of(run_dir: str | Path) -> list[dict]:
    """All events of the run, read incrementally between calls (a rewritten file is re-read)."""
    path = Path(run_dir) / EVENTS_FILE
    key = str(path)
    with _CACHE_LOCK:
        tail, events = _CACHE.get(key, (None, None))
        if tail is None or not path.exists() or path.stat().st_size < tail.offset:
            tail, events = EventTail(path), []
        events = events + tail.poll()
        _CACHE[key] = (tail, events)
        return events


def log_tail(path: Path, lines: int = 30, max_bytes: int = 16384) -> str:
    if not path.is_file():
        return ""
    with open(path, "rb") as fh:
        fh.seek(0, 2)
        size = fh.tell()
        fh.seek(max(0, size - max_bytes))
        text = fh.read().decode("utf-8", "replace")
    return "\n".join(text.replace("\r", "\n").splitlines()[-lines:])


def _memory_text(e: dict) -> str:
    if "vram_mb" in e:
        return f"VRAM {e['vram_mb'] / 1024:.1f} GB (peak {e.get('vram_peak_mb', e['vram_mb']) / 1024:.1f} GB)"
    if "rss_peak_mb" in e:
        return f"RAM peak {e['rss_peak_mb'] / 1024:.1f} GB (CPU run)"
    return ""


def watch(run_dir: str | Path) -> RunView:
    import json

    from studio.train import runner
    from studio.train.queue import QUEUE

    run_dir = Path(run_dir)
    events = events_of(run_dir)
    status = runner.read_status(run_dir, events)
    view = RunView(run_dir, run_dir.name, status.state, status.step, status.max_steps, output=status.output,
                   error=status.error, fix=status.fix, method=status.method)
    try:
        view.config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        view.config = {}
    view.max_steps = view.max_steps or int(view.config.get("max_train_steps") or 0)
    view.method = view.method or view.config.get("method", "")

    by_step: dict[int, dict] = {}  # a resumed run may repeat steps after its checkpoint: the later wins
    samples: dict[int, list[str]] = {}
    for e in events:
        t = e["type"]
        if t == "step" and e.get("loss") is not None:
            by_step[int(e["step"])] = e
        elif t == "start" and e.get("step") is not None:  # resumed: drop steps after the checkpoint
            by_step = {s: v for s, v in by_step.items() if s <= int(e["step"])}
        elif t == "sample":
            samples[int(e.get("step", 0))] = list(e.get("paths", []))
        elif t == "done":
            view.eval_loss = e.get("eval_loss")
        if view.started is None:
            view.started = e.get("time")
        if t in ("done", "error"):
            view.ended = e.get("time")
        elif t == "start":
            view.ended = None
    steps = sorted(by_step)
    view.loss_steps = steps
    view.losses = [float(by_step[s]["loss"]) for s in steps]
    view.smoothed = smooth(view.losses)
    if steps:
        last = by_step[steps[-1]]
        view.lr, view.memory = last.get("lr"), _memory_text(last)
        recent = [by_step[s] for s in steps[-20:]]
        if len(recent) >= 2 and recent[-1]["time"] > recent[0]["time"]:
            view.it_per_s = (recent[-1]["step"] - recent[0]["step"]) / (recent[-1]["time"] - recent[0]["time"])
        else:
            view.it_per_s = last.get("it_per_s")
        if view.state == "running" and view.it_per_s and view.max_steps:
            view.eta_s = max(0, view.max_steps - view.step) / view.it_per_s
    view.samples = [(p, s) for s in sorted(samples) for p in samples[s] if Path(p).is_file()]
    view.log_tail = log_tail(run_dir / "train.log")
    view.queue_position = QUEUE.position(run_dir)
    if view.queue_position:
        view.state = "queued"
    elif view.state == "new" and not events:
        handle = runner._LIVE.get(str(run_dir))
        if handle is not None and handle.alive():
            view.state = "starting"
        elif handle is not None or view.log_tail:
            view.state, view.error = "error", _error_from_log(view.log_tail)
            view.fix = view.fix or "Fix the setting named above, then Start again."
    return view


def _error_from_log(text: str) -> str:
    """The 'error: ...' line the CLI prints for a StudioError, else the last line of the log."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if ln.startswith("error: "):
            return " ".join(x.strip() for x in lines[i:i + 2] if not x.startswith("What to do"))[len("error: "):]
    return ("The run stopped before training began: " + lines[-1]) if lines else "The run stopped before training began."


def plot_points(view: RunView, max_points: int = MAX_PLOT_POINTS) -> list[dict]:
    """Rows {step, loss, series} for a line plot: 'raw' and 'smoothed', thinned to ``max_points`` each."""
    n = len(view.loss_steps)
    stride = max(1, -(-n // max_points))
    idx = list(range(0, n, stride))
    if n and idx[-1] != n - 1:
        idx.append(n - 1)
    rows = [{"step": view.loss_steps[i], "loss": view.losses[i], "series": "raw"} for i in idx]
    rows += [{"step": view.loss_steps[i], "loss": view.smoothed[i], "series": "smoothed"} for i in idx]
    return rows


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m" if h else (f"{m}m {s:02d}s" if m else f"{s}s")


def current_run(runs_root: str | Path) -> Path | None:
    """The run a fresh page shows: one training now, else the next queued, else the newest."""
    from studio.train import runner
    from studio.train.queue import QUEUE

    root = Path(runs_root)
    for key, handle in list(runner._LIVE.items()):
        if handle.alive() and Path(key).parent == root:
            return Path(key)
    for queued in QUEUE.pending():
        if queued.parent == root:
            return queued
    if not root.is_dir():
        return None
    runs = [p for p in root.iterdir() if p.is_dir() and (p / "config.json").is_file()]
    return max(runs, key=lambda p: (p / "config.json").stat().st_mtime) if runs else None
