"""Resumable checkpoints: ``<run>/checkpoints/step-000123/``, each written whole or not at all.

A checkpoint is built in a hidden ``.tmp-*`` folder beside its final name (every file fsynced),
then renamed into place in one step; old ones are renamed to a hidden ``.trash-*`` name before
being deleted. So a kill at any moment leaves only complete ``step-*`` folders plus hidden
leftovers, which ``clean_leftovers`` removes on the next start.

Contents: ``trainable.safetensors`` (every trainable tensor by component and name),
``optimizer.pt`` / ``scheduler.pt`` / ``scaler.pt`` (state dicts, read back with
``weights_only=True``), ``rng.safetensors`` (torch CPU/CUDA and generator states) and
``state.json`` (step, data position, python / numpy RNG states).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

CKPT_DIR = "checkpoints"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def clean_leftovers(run_dir: Path) -> None:
    """Remove hidden temporary files / folders a killed process left in the run folder."""
    for folder in (run_dir, run_dir / CKPT_DIR, run_dir / "samples"):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if p.name.startswith((".tmp-", ".trash-")) or (p.name.startswith(".") and p.name.endswith(".tmp")):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def list_checkpoints(run_dir: Path) -> list[Path]:
    folder = Path(run_dir) / CKPT_DIR
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step-")
                   and (p / "state.json").exists()), key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir: Path, step: int, trainable: dict, optimizer, scheduler, scaler, rng: dict,
                    state: dict, keep: int = 2, extra_files: dict | None = None,
                    row_starts: dict[str, int] | None = None) -> Path:
    """Write a checkpoint atomically; ``extra_files`` maps names to writer(path) callables.

    ``row_starts``: trainable key -> first trained row, for parameters of which only the last rows
    train (Textual Inversion's new token rows in a 49k-row embedding matrix). Only those rows, and
    the same rows of the optimizer's moments, are saved; ``expand_rows`` rebuilds the rest on resume.
    """
    import torch
    from safetensors.torch import save_file

    row_starts = row_starts or {}
    opt_state = optimizer.state_dict()
    if row_starts:
        trainable, opt_state = _slice_rows(trainable, opt_state, optimizer, row_starts)
        state = {**state, "row_starts": row_starts}

    folder = Path(run_dir) / CKPT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:06d}"
    tmp = folder / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
    torch.save(opt_state, tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    if scaler is not None:
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
    save_file({k: v.contiguous() for k, v in rng.items()}, str(tmp / "rng.safetensors"))
    for name, writer in (extra_files or {}).items():
        writer(tmp / name)
    (tmp / "state.json").write_text(json.dumps({**state, "step": step, "saved_at": time.time()}, indent=1))
    for p in tmp.iterdir():
        _fsync_file(p)
    _fsync_dir(tmp)
    if final.exists():  # a re-save of the same step (e.g. cancel right after a periodic save)
        trash = folder / f".trash-{final.name}-{os.getpid()}"
        final.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
    tmp.rename(final)
    _fsync_dir(folder)
    for old in list_checkpoints(run_dir)[:-keep]:
        trash = folder / f".trash-{old.name}"
        old.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
    return final


def _param_rows(optimizer, trainable: dict, row_starts: dict[str, int]) -> dict[int, tuple[int, int]]:
    """Optimizer state index -> (first trained row, total rows), for the row-trained parameters."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    out = {}
    for key, start in row_starts.items():
        for i, p in enumerate(params):
            if p is trainable[key]:
                out[i] = (start, p.shape[0])
    return out


def _slice_rows(trainable: dict, opt_state: dict, optimizer, row_starts: dict[str, int]):
    rows = _param_rows(optimizer, trainable, row_starts)
    tensors = {k: (v[row_starts[k]:] if k in row_starts else v) for k, v in trainable.items()}
    sliced = {}
    for i, st in opt_state["state"].items():
        if i in rows:
            start, n = rows[i]
            # clone: torch.save writes a view's whole storage, which would keep every row on disk
            st = {name: (t[start:].clone() if getattr(t, "dim", lambda: 0)() > 0 and t.shape[0] == n else t)
                  for name, t in st.items()}
        sliced[i] = st
    return tensors, {**opt_state, "state": sliced}


def expand_rows(saved: dict, opt_state: dict, optimizer, trainable: dict, row_starts: dict[str, int]) -> dict:
    """Put a row-sliced checkpoint back into full-size tensors, in place: trained rows into the live
    parameters (the other rows are the base model's, untouched by training) and the optimizer's
    moments padded with zeros (exactly what masked gradients leave in AdamW's moments)."""
    import torch

    rows = _param_rows(optimizer, trainable, row_starts)
    with torch.no_grad():
        for key, start in row_starts.items():
            trainable[key][start:].copy_(saved.pop(key))
    for i, st in opt_state["state"].items():
        if i in rows:
            start, n = rows[i]
            for name, t in list(st.items()):
                if getattr(t, "dim", lambda: 0)() > 0 and t.shape[0] == n - start:
                    full = torch.zeros((n, *t.shape[1:]), dtype=t.dtype)
                    full[start:] = t
                    st[name] = full
    return opt_state


def load_checkpoint(path: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    out = {
        "trainable": load_file(str(path / "trainable.safetensors")),
        "optimizer": torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True),
        "scheduler": torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True),
        "scaler": torch.load(path / "scaler.pt", map_location="cpu", weights_only=True)
        if (path / "scaler.pt").exists() else None,
        "rng": load_file(str(path / "rng.safetensors")),
        "state": json.loads((path / "state.json").read_text()),
    }
    return out


# ---- RNG states ---------------------------------------------------------------------------

def capture_rng(generator, py_rng) -> tuple[dict, dict]:
    """(tensors, json-able) describing every RNG a run draws from."""
    import random

    import numpy as np
    import torch

    tensors = {"torch_cpu": torch.get_rng_state(), "generator": generator.get_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    np_state = np.random.get_state()
    js = {
        "python_global": _jsonable(random.getstate()),
        "python_captions": _jsonable(py_rng.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, js


def restore_rng(tensors: dict, js: dict, generator, py_rng) -> None:
    import random

    import numpy as np
    import torch

    torch.set_rng_state(tensors["torch_cpu"])
    generator.set_state(tensors["generator"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    random.setstate(_tupled(js["python_global"]))
    py_rng.setstate(_tupled(js["python_captions"]))
    n = js["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def _jsonable(state):
    return [state[0], list(state[1]), state[2]]


def _tupled(state):
    return (state[0], tuple(state[1]), state[2])
