"""From the Train tab's form to a run: how many steps a setting makes, and the config it becomes.

Kept out of the UI so the CLI (and tests) can use the same arithmetic. The step count follows the
engine exactly: every image appears ``repeats`` times per epoch (kohya ``N_name`` folders),
images are grouped by aspect-ratio bucket, each bucket is cut into batches (its last batch may be
smaller), and ``gradient_accumulation_steps`` batches make one optimizer step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from studio.errors import StudioError
from studio.train.config import METHODS_HERE, METHODS_NEXT, TrainConfig, list_presets, load_preset, resolve_config

METHODS = METHODS_HERE + METHODS_NEXT
METHOD_HELP = {
    "lora": "LoRA: the standard small adapter; works everywhere. Start here.",
    "locon": "LoCon: LoRA that also adapts the convolution layers; a bit more detail for styles.",
    "loha": "LoHa (LyCORIS): Hadamard-product adapter; more expressive at the same file size. Wants a higher learning rate.",
    "lokr": "LoKr (LyCORIS): Kronecker-product adapter; very small files. Wants a higher learning rate.",
    "dora": "DoRA: LoRA that learns direction and magnitude separately; often closer to full fine-tuning.",
    "ti": "Textual inversion: learns a new word (an embedding), not model weights. Tiny file.",
    "dreambooth-lora": "DreamBooth LoRA: a LoRA trained with class (regularisation) images to keep the class intact.",
    "dreambooth": "DreamBooth: fine-tunes the whole model; needs much more VRAM and makes a full checkpoint.",
}

# Form fields that are config keys, in the order the Train tab lays them out. ``duplicate`` and
# ``preset_values`` return values for exactly these keys.
FORM_KEYS = [
    "method", "resolution", "batch_size", "gradient_accumulation_steps", "max_train_steps",
    "rank", "alpha", "learning_rate", "optimizer", "lr_scheduler", "lr_warmup_steps",
    "train_text_encoder", "text_encoder_lr", "sample_every_n_steps", "save_every_n_steps", "sample_prompts",
    "sample_steps", "output_name", "seed", "mixed_precision", "gradient_checkpointing", "cache_latents",
    "enable_buckets", "noise_offset", "min_snr_gamma", "caption_dropout", "shuffle_tags", "keep_tokens",
    "clip_skip", "save_dtype",
]
_INT_KEYS = {"resolution", "batch_size", "gradient_accumulation_steps", "max_train_steps", "rank", "lr_warmup_steps",
             "sample_every_n_steps", "save_every_n_steps", "sample_steps", "seed", "keep_tokens", "clip_skip"}


@dataclass
class StepPlan:
    images: int  # training images (regularisation images counted separately)
    repeats: list[int]  # the distinct repeat counts of the folders
    image_repeats: int  # images counted with their repeats (all images, reg included): one epoch
    reg_images: int
    batch_size: int
    accumulation: int
    steps_per_epoch: int
    epochs: float
    steps: int
    line: str
    notes: list[str] = field(default_factory=list)


def _fmt_epochs(epochs: float) -> str:
    return str(int(epochs)) if float(epochs).is_integer() else f"{epochs:.2f}".rstrip("0").rstrip(".")


def plan_steps(dataset: str | Path, batch_size: int = 1, accumulation: int = 1, epochs: float = 0,
               max_steps: int = 0, resolution: int = 512, enable_buckets: bool = True, bucket_step: int = 64,
               min_bucket_side: int = 256, max_bucket_side: int = 0) -> StepPlan:
    """The one line that explains the run's length; ``epochs`` > 0 wins over ``max_steps``."""
    from studio.dataset import scan_dataset
    from studio.train.data import make_buckets_for, pick_bucket

    batch_size, accumulation = max(1, int(batch_size or 1)), max(1, int(accumulation or 1))
    ds = scan_dataset(dataset)
    if not ds.items:
        raise StudioError(f"The dataset {dataset} has no usable images.",
                          "Add images (with .txt captions) in the Dataset tab, or pick another dataset.")
    cfg = TrainConfig(resolution=int(resolution), enable_buckets=bool(enable_buckets), bucket_step=int(bucket_step),
                      min_bucket_side=int(min_bucket_side), max_bucket_side=int(max_bucket_side))
    buckets = make_buckets_for(cfg)
    per_bucket: dict[tuple, int] = {}
    for item in ds.items:
        size = tuple(item.size) if item.size and item.size[0] else (cfg.resolution, cfg.resolution)
        b = pick_bucket(size, buckets)
        per_bucket[b] = per_bucket.get(b, 0) + max(1, int(item.repeats))
    batches = sum(math.ceil(n / batch_size) for n in per_bucket.values())
    steps_per_epoch = max(1, batches // accumulation)

    train = ds.train_items
    repeats = sorted({max(1, int(i.repeats)) for i in train})
    image_repeats = sum(per_bucket.values())
    if epochs and float(epochs) > 0:
        steps = max(1, math.ceil(float(epochs) * steps_per_epoch))
        epochs = float(epochs)
    else:
        steps = max(1, int(max_steps or 1))
        epochs = steps / steps_per_epoch

    if len(repeats) == 1:
        head = f"{len(train)} images x {repeats[0]} repeats"
    else:
        head = f"{len(train)} images ({image_repeats} with their folders' repeats)"
    reg = len(ds.reg_items)
    if reg:
        head += f" + {reg} regularisation images"
    per = f" / batch {batch_size}" + (f" / accumulation {accumulation}" if accumulation > 1 else "")
    line = f"{head} x {_fmt_epochs(round(epochs, 2))} epochs{per} = {steps} steps"
    notes = []
    naive = max(1, math.ceil(image_repeats / batch_size) // accumulation)
    if naive != steps_per_epoch:
        notes.append(f"{steps_per_epoch} steps per epoch: images of different shapes go in separate buckets, "
                     "and each bucket's last batch may be smaller.")
    if not float(epochs).is_integer():
        notes.append("The last epoch is partial: training stops at the step count.")
    return StepPlan(len(train), repeats, image_repeats, reg, batch_size, accumulation, steps_per_epoch,
                    epochs, steps, line, notes)


def preset_values(preset: str | None) -> dict:
    """The form values a preset means (defaults for the keys it does not set)."""
    cfg = resolve_config({}, preset or None, need_inputs=False)
    return {k: getattr(cfg, k) for k in FORM_KEYS}


def preset_choices() -> list[tuple[str, str]]:
    """(label, name) for the preset dropdown; "(none)" keeps the built-in defaults."""
    out = [("(none: built-in defaults)", "")]
    for name in list_presets():
        desc = load_preset(name).get("description", "")
        out.append((f"{name}: {desc[:70]}" if desc else name, name))
    return out


def _parse_extra(text: str) -> dict:
    """'key=value' per line (blank lines and # comments skipped) -> {key: value}."""
    out = {}
    for n, raw in enumerate((text or "").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "=" not in line:
            raise StudioError(f"Other settings, line {n}: {line!r} is not key=value.", "Write one per line, e.g. rank=8.")
        key, value = line.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def form_to_config(values: dict, extra: str = "") -> dict:
    """A config dict for ``runner.start_run`` from the form: base_model, dataset, preset, the
    ``FORM_KEYS`` values, optional ``epochs`` (> 0: the step count comes from the dataset) and
    ``extra`` 'key=value' lines. Empty values fall back to the preset / defaults."""
    cfg: dict = {}
    if values.get("preset"):
        cfg["preset"] = values["preset"]
    for key in ("base_model", "dataset"):
        if values.get(key):
            cfg[key] = str(values[key])
    for key in FORM_KEYS:
        v = values.get(key)
        if v is None or (isinstance(v, str) and v.strip() == "" and key not in ("sample_prompts",)):
            continue
        if key == "sample_prompts":
            v = [p.strip() for p in (v.splitlines() if isinstance(v, str) else v) if p and p.strip()]
        elif key in _INT_KEYS and isinstance(v, float) and v.is_integer():
            v = int(v)
        elif key in _INT_KEYS and isinstance(v, str) and v.strip().lstrip("-").isdigit():
            v = int(v)
        cfg[key] = v
    epochs = values.get("epochs") or 0
    if epochs and float(epochs) > 0:
        if not cfg.get("dataset"):
            raise StudioError("Epochs need a dataset to count its images.", "Choose a dataset first.")
        merged = resolve_config(dict(cfg), need_inputs=False)
        cfg["max_train_steps"] = plan_steps(cfg["dataset"], merged.batch_size, merged.gradient_accumulation_steps,
                                            float(epochs), resolution=merged.resolution,
                                            enable_buckets=merged.enable_buckets, bucket_step=merged.bucket_step,
                                            min_bucket_side=merged.min_bucket_side,
                                            max_bucket_side=merged.max_bucket_side).steps
    cfg.update(_parse_extra(extra))
    return cfg


def config_to_form(config: dict) -> dict:
    """A run's saved config.json -> form values (to duplicate a run): FORM_KEYS plus base_model and
    dataset; prompts as one per line; a fresh output name."""
    out = {k: config.get(k) for k in FORM_KEYS if k in config}
    if isinstance(out.get("sample_prompts"), list):
        out["sample_prompts"] = "\n".join(out["sample_prompts"])
    out["base_model"], out["dataset"] = config.get("base_model", ""), config.get("dataset", "")
    name = config.get("output_name") or "adapter"
    out["output_name"] = name if name.endswith("-copy") else f"{name}-copy"
    return out
