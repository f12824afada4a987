"""A run's result is published into the workspace's outputs folders, without losing other files."""

from __future__ import annotations

import os

from studio.places import Workspace
from studio.train.publish import outputs_folder, publish


def test_publish_links_into_the_method_folder_and_never_overwrites(tmp_path):
    ws = Workspace(tmp_path / "ws").ensure()
    run = ws.runs / "run1"
    run.mkdir()
    out = run / "mydog.safetensors"
    out.write_bytes(b"trained weights")
    p = publish(out, ws, "lora", "run1")
    assert p == ws.loras / "mydog.safetensors" and p.read_bytes() == b"trained weights"
    assert os.path.samefile(p, out)  # a hard link: no second copy on disk
    assert publish(out, ws, "lora", "run1") == p  # publishing the same file again changes nothing

    # a different file of the same name (an earlier LoRA) is kept; the new one gets the run's name
    run2 = ws.runs / "run2"
    run2.mkdir()
    other = run2 / "mydog.safetensors"
    other.write_bytes(b"another run")
    p2 = publish(other, ws, "lora", "run2")
    assert p2 == ws.loras / "mydog-run2.safetensors" and p2.read_bytes() == b"another run"
    assert p.read_bytes() == b"trained weights"
    assert sorted(x.name for x in ws.loras.iterdir()) == ["mydog-run2.safetensors", "mydog.safetensors"]

    # run1 resumed: it re-saves its adapter (a new file) and replaces what it published itself
    out.unlink()
    out.write_bytes(b"trained longer")
    assert publish(out, ws, "lora", "run1") == p
    assert p.read_bytes() == b"trained longer" and os.path.samefile(p, out)
    assert (ws.loras / "mydog-run2.safetensors").read_bytes() == b"another run"
    assert sorted(x.name for x in ws.loras.iterdir()) == ["mydog-run2.safetensors", "mydog.safetensors"]


def test_outputs_folder_per_method(tmp_path):
    ws = Workspace(tmp_path / "ws")
    assert outputs_folder(ws, "ti") == ws.embeddings
    assert outputs_folder(ws, "dreambooth") == ws.checkpoints
    for m in ("lora", "locon", "loha", "lokr", "dora", "dreambooth-lora"):
        assert outputs_folder(ws, m) == ws.loras
