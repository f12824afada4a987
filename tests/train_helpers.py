"""What the training tests share: a tiny dataset, a tiny-run config, the events of a run."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from studio.train.config import TrainConfig, resolve_config


def make_dataset(root: Path, subset: str, caption) -> Path:
    """4 images (64 px, one 96x64) in a kohya ``subset`` folder; ``caption(colour)`` gives each text.

    Each image is one colour plus noise: something a tiny model can learn within a few steps.
    """
    from PIL import Image

    sub = root / subset
    sub.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        w, h = (96, 64) if i == 3 else (64, 64)
        base = np.zeros((h, w, 3), np.float32)
        base[..., i % 3] = 200
        arr = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype("uint8")
        Image.fromarray(arr).save(sub / f"img{i}.png")
        (sub / f"img{i}.txt").write_text(caption(["red", "green", "blue"][i % 3]))
    return root


def cfg_for(model: Path, dataset: Path, out: Path, **kw) -> TrainConfig:
    """A tiny run: 32 px, rank 4, fp32 output, CPU; ``kw`` overrides any key."""
    base = dict(base_model=str(model), dataset=str(dataset), output_dir=str(out), max_train_steps=10,
                resolution=32, min_bucket_side=16, bucket_step=16, rank=4, alpha=4, learning_rate=3e-3,
                batch_size=2, seed=3, device="cpu", gradient_checkpointing=False, save_dtype="fp32")
    base.update(kw)
    return resolve_config(base)


def events_of(run: Path) -> list[dict]:
    from studio.train.events import read_events

    return read_events(run / "events.jsonl")
