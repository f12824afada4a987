"""Put a run's result where the other tabs look for it.

Runs write into their own folder (``runs/<name>/``); the Merge and Generate tabs, ``<lora:name>``
tags and a webUI pointed at the workspace look in ``outputs/loras`` (``outputs/embeddings`` for
Textual Inversion, ``outputs/checkpoints`` for a full fine-tune). The file is hard-linked there (no
second copy on disk; copied where links are not possible), atomically, and never over a different
file of the same name: a user's earlier LoRA is not lost to a new run with the same output name.
"""

from __future__ import annotations

import filecmp
import os
import shutil
from pathlib import Path

from studio.fileio import atomic_path
from studio.places import Workspace


def outputs_folder(workspace: Workspace, method: str) -> Path:
    if method == "ti":
        return workspace.embeddings
    if method == "dreambooth":
        return workspace.checkpoints
    return workspace.loras


def publish(output: Path, workspace: Workspace, method: str, run_name: str) -> Path:
    """Link ``output`` into the workspace's outputs folder for ``method``; returns the published path.

    A run may replace what it published before (a resumed run re-saves its adapter); any other
    file of the same name is kept and the new one takes the run's name as a suffix.
    """
    folder = outputs_folder(workspace, method)
    record = output.parent / f".published-{output.name}"  # what this run published last time
    ours = Path(record.read_text().strip()) if record.exists() else None
    target = folder / output.name
    if target.exists() and target != ours:
        if filecmp.cmp(target, output, shallow=False):
            return target  # already there (rename() onto a link of the same file would do nothing)
        target = folder / f"{output.stem}-{run_name}{output.suffix}"
        n = 2
        while target.exists() and target != ours and not filecmp.cmp(target, output, shallow=False):
            target = folder / f"{output.stem}-{run_name}-{n}{output.suffix}"
            n += 1
    if target.exists() and os.path.samefile(target, output):
        return target
    with atomic_path(target) as tmp:
        tmp.unlink()
        try:
            os.link(output, tmp)
        except OSError:  # another filesystem, or links not allowed
            shutil.copyfile(output, tmp)
    from studio.fileio import atomic_write_text

    atomic_write_text(record, str(target))
    return target
