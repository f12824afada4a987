"""DreamBooth (methods ``dreambooth-lora`` and ``dreambooth``): instance prompt + prior preservation.

As diffusers' ``train_dreambooth[_lora].py``: every instance image is captioned with
``instance_prompt`` (a rare token plus the class, "a photo of sks dog"); with a ``class_prompt``
(or ``class_images_dir``) each batch is the instance images followed by as many class images, one
forward pass, and the loss is ``mean(instance half) + prior_loss_weight * mean(class half)``.

Class images are generated once by the base model into
``<workspace>/class_images/<family>-<hash of model + class prompt + resolution>/class-NNNNN.png``
(image i always uses seed i, each file is written atomically), so a later run with the same
model, prompt and resolution reuses them and only generates what is missing. Or bring your own
with ``class_images_dir``.

``dreambooth`` (full fine-tune) writes a single-file checkpoint in the webUI layout that carries
the base model's diffusers configs (metadata ``studio.configs``) so it loads offline, and can
extract a LoRA from it (``studio.merge.extract``).
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from studio.errors import StudioError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def prior_preservation(cfg) -> bool:
    return cfg.method.startswith("dreambooth") and bool(cfg.class_prompt or cfg.class_images_dir)


# ---- class images -------------------------------------------------------------------------

def model_identity(source) -> str:
    """The base model as a string that changes when its weights do (path, sizes, mtimes)."""
    path = getattr(source, "path", None)
    if path is None:
        return str(source.spec)
    path = Path(path)
    files = [path / "model_index.json", *sorted((path / "unet").glob("*.safetensors"))] if path.is_dir() else [path]
    stats = [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files if f.exists()]
    return "|".join([str(path.resolve()), *stats])


def class_images_folder(cfg, source, family: str) -> Path:
    from studio.places import Settings, Workspace

    key = f"{model_identity(source)}|{cfg.class_prompt}|{cfg.resolution}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Workspace(Settings.load().workspace_path()).root / "class_images" / f"{family}-{digest}"


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))


def ensure_class_images(cfg, pipe, source, family: str, device, main: bool) -> tuple[list[Path], int, Path]:
    """(class image paths, how many this call generated, their folder)."""
    if cfg.class_images_dir:
        folder = Path(cfg.class_images_dir).expanduser()
        found = list_images(folder)[:cfg.num_class_images]
        if not found:
            raise StudioError(f"Config key 'class_images_dir': {folder} holds no images.",
                              "Add .png / .jpg class images, or leave class_images_dir empty to generate them.")
        return found, 0, folder
    folder = class_images_folder(cfg, source, family)
    wanted = [folder / f"class-{i:05d}.png" for i in range(cfg.num_class_images)]
    missing = [(i, p) for i, p in enumerate(wanted) if not p.exists()]
    if missing and main:
        from studio.fileio import atomic_write
        from studio.train.export import txt2img

        folder.mkdir(parents=True, exist_ok=True)
        pipe.to(device)
        for i, path in missing:
            image = txt2img(pipe, cfg.class_prompt, negative=cfg.sample_negative, steps=cfg.sample_steps,
                            cfg=cfg.sample_cfg, width=cfg.resolution, height=cfg.resolution, seed=i,
                            sampler=cfg.sample_sampler)
            atomic_write(path, lambda tmp, im=image: im.save(tmp, format="PNG"))
        pipe.to("cpu")
    return wanted, len(missing) if main else 0, folder


def class_pool(paths: list[Path], cfg, buckets: set, first_index: int) -> dict:
    """bucket -> class-image entries resized to that bucket (the class half must match the instance half)."""
    from PIL import Image

    from studio.train.data import Entry

    pool: dict = {}
    index = first_index
    for path in paths:
        caption = cfg.class_prompt
        if not caption and path.with_suffix(".txt").exists():
            caption = path.with_suffix(".txt").read_text(encoding="utf-8").strip()
        if not caption:
            raise StudioError(f"The class image {path.name} has no caption and 'class_prompt' is empty.",
                              "Set class_prompt (e.g. 'a photo of a dog').")
        with Image.open(path) as im:
            size = im.size
        for bucket in sorted(buckets):
            pool.setdefault(bucket, []).append(Entry(index, path, caption, size, bucket, 1, cfg.prior_loss_weight))
            index += 1
    return pool


def class_batch(pool: dict, bucket: tuple, n: int, seed: int, step: int, micro: int, rank: int) -> list:
    """``n`` class entries for one micro-batch: a pure function of its position (so resume replays it)."""
    rng = random.Random(f"studio-class-{seed}-{rank}-{step}-{micro}")
    candidates = pool[bucket]
    return rng.sample(candidates, n) if len(candidates) >= n else [rng.choice(candidates) for _ in range(n)]


# ---- the loss ----------------------------------------------------------------------------

def split_loss(per_sample, n_instance: int, prior_weight: float):
    """(total, instance, prior): the batch is [instance images..., class images...]; each term is
    the mean of its own half's per-image losses, and total = instance + prior_weight * prior."""
    instance = per_sample[:n_instance].mean()
    prior = per_sample[n_instance:].mean()
    return instance + prior_weight * prior, instance, prior


# ---- the full fine-tune's outputs ------------------------------------------------------------

def base_configs(source) -> str | None:
    """The base model's diffusers configs + tokenizers as ``studio.configs`` JSON, when it has them locally."""
    from studio.tiny import EMBEDDED_CONFIG_KEY, embedded_configs

    embedded = (getattr(source, "metadata", None) or {}).get(EMBEDDED_CONFIG_KEY)
    if embedded:
        return embedded
    path = getattr(source, "path", None)
    if path is not None and (Path(path) / "model_index.json").is_file():
        return embedded_configs(Path(path))
    return None


def save_checkpoint_file(path: Path, pipe, family: str, source, dtype, metadata: dict) -> Path:
    """The whole pipeline as one webUI single-file checkpoint (atomically), configs embedded."""
    from studio.fileio import save_safetensors
    from studio.models.family import base_family
    from studio.models.ldm import pipeline_to_ldm
    from studio.tiny import EMBEDDED_CONFIG_KEY

    state = {k: v.detach().cpu() for k, v in pipeline_to_ldm(pipe, family, dtype=dtype).items()}
    arch = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512",
            "sdxl": "stable-diffusion-xl-v1-base"}[base_family(family)]
    if family == "sd2-v":
        arch = "stable-diffusion-v2-768-v"
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    meta = {"modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": arch,
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models"
            if base_family(family) == "sdxl" else "diffusers",
            "modelspec.title": Path(path).stem, "modelspec.prediction_type": "v" if prediction == "v_prediction"
            else "epsilon", **metadata}
    configs = base_configs(source)
    if configs:
        meta[EMBEDDED_CONFIG_KEY] = configs
    return save_safetensors(path, state, meta)


def base_file_for_extraction(run_dir: Path, pipe, family: str, source, dtype) -> Path:
    """A single file of the untouched base model for ``extract`` (the base itself when it is one)."""
    path = getattr(source, "path", None)
    if path is not None and Path(path).is_file() and Path(path).suffix.lower() == ".safetensors":
        return Path(path)
    out = Path(run_dir) / "base-for-extract.safetensors"
    if not out.exists():
        save_checkpoint_file(out, pipe, family, source, dtype, {"modelspec.description": "base model copy"})
    return out


def extract_lora(tuned: Path, base: Path, out: Path, rank: int, dtype) -> Path:
    try:
        from studio.merge.extract import extract
    except ImportError as err:  # pragma: no cover - the merge issue ships it
        raise StudioError("Config key 'extract_lora_rank': LoRA extraction is not available in this version.",
                          "Set extract_lora_rank to 0; the checkpoint itself is complete.") from err
    return Path(extract(tuned, base, out, rank=rank, dtype=dtype).path)
