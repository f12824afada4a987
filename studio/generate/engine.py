"""Text-to-image, as the webUIs do it.

``txt2img`` works on a pipeline the caller already holds (the training engine's previews use it
with its own pipe, inside its own GPU job); it does not take the GPU gate. ``generate`` is the
whole studio path: it takes the gate, gets the base model from ``MODELS`` (never reloading it for
a change of adapters), applies the adapter stack the webUI way, generates, restores the base
weights exactly, and saves PNGs with A1111 ``parameters`` text.

Determinism: image ``i`` of a batch uses its own CPU generator seeded ``seed + i`` (as A1111
numbers them), so one seed gives the same picture alone or in a batch, on any device.
Cancelling (``cancel`` set) raises ``StudioError("Cancelled.")`` at the next step; nothing is
returned or saved for that call.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from studio.errors import StudioError

MAX_SEED = 2**32 - 1


def resolve_seed(seed: int | None) -> int:
    if seed is None or int(seed) < 0:
        return random.randint(0, MAX_SEED)
    return int(seed)


def _check_size(pipe, width, height) -> tuple[int, int]:
    scale = getattr(pipe, "vae_scale_factor", 8)
    default = pipe.unet.config.sample_size * scale
    width, height = int(width or default), int(height or default)
    multiple = scale * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    if width < multiple or height < multiple or width % 8 or height % 8:
        raise StudioError(f"Size {width}x{height} does not suit this model.",
                          f"Width and height must be multiples of 8 and at least {multiple}.")
    return width, height


def txt2img(pipe, prompt, negative="", steps=20, cfg=7.0, width=None, height=None, seed=0, sampler="Euler a",
            clip_skip=1, batch=1, callback=None, cancel=None, embeddings=None):
    """Generate ``batch`` images with an already-loaded SD / SDXL pipeline; returns PIL images.

    ``prompt`` may use the A1111 attention syntax; ``<lora:...>`` tags in it are ignored here
    (``generate`` resolves them). ``callback(step, total)`` is called after each step; ``cancel``
    (a threading.Event) stops at the next step with StudioError("Cancelled.").
    ``embeddings``: optional {token: vectors} of textual-inversion embeddings (see prompt.encode_prompt).
    The pipeline's scheduler is replaced for the call and put back after it.
    """
    import torch

    from studio.generate.prompt import encode_prompt, extract_network_tags, pad_to_same_length, pipe_family
    from studio.generate.samplers import make_scheduler

    if steps < 1 or batch < 1:
        raise StudioError(f"Steps and batch size must be at least 1 (got {steps} and {batch}).", "Raise them.")
    width, height = _check_size(pipe, width, height)
    seed = resolve_seed(seed)
    prompt, _, _ = extract_network_tags(prompt)
    negative, _, _ = extract_network_tags(negative or "")
    if cancel is not None and cancel.is_set():
        raise StudioError("Cancelled.")
    sdxl = pipe_family(pipe) == "sdxl"
    pos = encode_prompt(pipe, prompt, clip_skip, embeddings)
    if sdxl and not negative.strip():
        # A1111 and diffusers both use zeros for an empty SDXL negative prompt.
        neg_embeds, neg_pooled = torch.zeros_like(pos.embeds), torch.zeros_like(pos.pooled)
    else:
        neg = encode_prompt(pipe, negative, clip_skip, embeddings)
        neg_embeds, neg_pooled = neg.embeds, neg.pooled
    if pos.embeds.shape[1] != neg_embeds.shape[1]:
        empty = encode_prompt(pipe, "", clip_skip).embeds
        pos_embeds, neg_embeds = pad_to_same_length(pos.embeds, neg_embeds, empty, empty)
    else:
        pos_embeds = pos.embeds

    def on_step(_pipe, i, _t, kwargs):
        if cancel is not None and cancel.is_set():
            raise StudioError("Cancelled.")
        if callback is not None:
            callback(i + 1, steps)
        return kwargs

    dtype = pipe.unet.dtype
    kwargs = dict(prompt_embeds=pos_embeds.to(dtype), negative_prompt_embeds=neg_embeds.to(dtype),
                  num_inference_steps=steps, guidance_scale=cfg, width=width, height=height,
                  num_images_per_prompt=batch,
                  generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(batch)],
                  callback_on_step_end=on_step, output_type="pil")
    if sdxl:
        kwargs.update(pooled_prompt_embeds=pos.pooled.to(dtype), negative_pooled_prompt_embeds=neg_pooled.to(dtype))
    original = pipe.scheduler
    pipe.scheduler = make_scheduler(sampler, original.config)
    try:
        with torch.no_grad():
            images = pipe(**kwargs).images
    finally:
        pipe.scheduler = original
    return list(images)


# ------------------------------------------------------------------------------------------------
# The whole studio path: gate, shared model, adapters, PNGs with infotext.


@dataclass
class AdapterChoice:
    path: str
    weight: float = 1.0  # UNet weight (and text-encoder weight unless te_weight is given)
    te_weight: float | None = None


@dataclass
class GenerateRequest:
    model: str
    prompt: str
    negative: str = ""
    steps: int = 20
    cfg: float = 7.0
    width: int | None = None
    height: int | None = None
    seed: int = -1  # -1: random
    sampler: str = "Euler a"
    clip_skip: int = 1
    batch: int = 1
    adapters: list[AdapterChoice] = field(default_factory=list)
    embeddings: list[str] = field(default_factory=list)  # files; the token is the file stem
    out_dir: str | None = None  # default: the workspace images folder
    out_file: str | None = None  # exact path for the first image (CLI --out)
    save: bool = True
    device: str | None = None
    dtype: object = None


@dataclass
class GenerateResult:
    images: list
    paths: list[Path]
    infotexts: list[str]
    seeds: list[int]
    warnings: list[str]
    seconds: float


_ADAPTERS: dict[tuple, object] = {}  # (path, size, mtime) -> AdapterFile: re-reading a file is skipped


def _read_adapter(path: str):
    from studio.adapters import load_adapter

    p = Path(path).expanduser()
    if not p.is_file():
        raise StudioError(f"Adapter file not found: {path}", "Check the path, or pick the file again.")
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _ADAPTERS:
        if len(_ADAPTERS) > 16:
            _ADAPTERS.pop(next(iter(_ADAPTERS)))
        _ADAPTERS[key] = load_adapter(p)
    return _ADAPTERS[key]


def lora_search_dirs() -> list[Path]:
    from studio.places import Settings, Workspace

    settings = Settings.load()
    return [Workspace(settings.workspace_path()).loras, *map(Path, settings.lora_dirs)]


def find_lora(name: str, extra: list[Path] = ()) -> Path:
    """The file a ``<lora:name:w>`` tag means: ``name.safetensors`` in the given files' folders,
    the workspace's LoRA folder or the webUI LoRA folders of Settings (searched recursively)."""
    if not name or any(c in name for c in "/\\*?[") or name.startswith(".") or ".." in name:
        # A tag names a file by its stem, as in the webUIs; anything path-like could reach outside
        # the LoRA folders (a prompt can come from a pasted PNG or a guest on a share link).
        raise StudioError(f"<lora:{name}:...> is not a LoRA name.",
                          "Use the file's name without folder or extension, e.g. <lora:my_style:0.8>.")
    for folder in [*extra, *lora_search_dirs()]:
        if not folder.is_dir():
            continue
        for suffix in (".safetensors", ".pt", ".ckpt"):
            direct = folder / f"{name}{suffix}"
            if direct.is_file():
                return direct
        for hit in sorted(folder.rglob(f"{name}.safetensors")):
            return hit
    raise StudioError(f"<lora:{name}:...> in the prompt names no LoRA file the studio can find.",
                      "Put the file in the workspace's outputs/loras folder or a LoRA folder listed in Settings, "
                      "or add it in the adapter list.")


def _cached_hash(path: Path, kind: str) -> str:
    """A1111's short hashes, cached by (path, size, mtime): 'model' = sha256 of the file, 10 hex;
    'lora' = sha256 after the safetensors header (addnet hash), 12 hex; 'ti' = sha256 of the file, 12 hex."""
    import json

    from studio.fileio import atomic_write_json, file_sha256, sshs_hashes
    from studio.places import cache_dir

    st = path.stat()
    key = f"{kind}|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    store = cache_dir() / "hashes.json"
    try:
        known = json.loads(store.read_text()) if store.exists() else {}
    except (OSError, ValueError):
        known = {}
    if key not in known:
        if kind == "lora" and path.suffix == ".safetensors":
            known[key] = sshs_hashes(path)[0][:12]
        else:
            known[key] = file_sha256(path)[: 10 if kind == "model" else 12]
        atomic_write_json(store, known)
    return known[key]


def _model_name_and_hash(source) -> tuple[str, str]:
    if source.kind == "single_file" and source.path is not None and Path(source.spec).is_file():
        return Path(source.spec).stem, _cached_hash(Path(source.spec), "model")
    return source.name, ""


def _out_dir(request: GenerateRequest) -> Path:
    if request.out_dir:
        return Path(request.out_dir).expanduser()
    from studio.places import Settings, Workspace

    return Workspace(Settings.load().workspace_path()).ensure().images


def _next_paths(folder: Path, n: int, seed: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    existing = [int(p.name.split("-", 1)[0]) for p in folder.glob("*.png") if p.name.split("-", 1)[0].isdigit()]
    start = max(existing, default=-1) + 1
    return [folder / f"{start + i:05d}-{seed + i}.png" for i in range(n)]


def resolve_adapters(request: GenerateRequest) -> tuple[str, list, list[str], dict[str, str]]:
    """Prompt without tags, the stack (list card + tags), warnings, and {name: lora hash}."""
    from studio.generate.apply import StackEntry
    from studio.generate.prompt import extract_network_tags, lora_tag, prompt_warnings

    clean, tags, warnings = extract_network_tags(request.prompt)
    warnings += prompt_warnings(clean)
    entries, hashes, tag_text = [], {}, []
    listed_dirs = []
    for choice in request.adapters:
        f = _read_adapter(choice.path)
        name = Path(choice.path).stem
        listed_dirs.append(Path(choice.path).expanduser().parent)
        entries.append(StackEntry(f, choice.weight, choice.te_weight, name))
        tag_text.append(lora_tag(name, choice.weight if choice.te_weight is None else choice.te_weight,
                                 choice.weight))
    for tag in tags:
        path = find_lora(tag.name, listed_dirs)
        entries.append(StackEntry(_read_adapter(str(path)), tag.unet, tag.te, tag.name))
    for e in entries:
        if e.adapter.kind == "embedding":
            raise StudioError(f"{e.name} is a textual-inversion embedding, not a LoRA.",
                              "Add it as an embedding and write its name in the prompt.")
        if e.name not in hashes:
            hashes[e.name] = _cached_hash(Path(e.adapter.path), "lora")
    # the prompt written to the PNG carries a tag per listed adapter, so a webUI applies them too
    infotext_prompt = request.prompt + ("".join(" " + t for t in tag_text) if tag_text else "")
    return infotext_prompt, entries, warnings, hashes


def generate(request: GenerateRequest, callback: Callable[[int, int], None] | None = None,
             cancel: threading.Event | None = None) -> GenerateResult:
    """Generate with the shared base model and the request's adapters; save PNGs with infotext."""
    from studio.adapters import load_embedding
    from studio.generate.apply import stack_for
    from studio.generate.infotext import GenerationParams, format_infotext, save_png
    from studio.generate.samplers import normalize
    from studio.jobs import GPU
    from studio.models.loader import MODELS

    t0 = time.time()
    sampler = normalize(request.sampler)
    infotext_prompt, entries, warnings, lora_hashes = resolve_adapters(request)
    embeddings, ti_hashes = {}, {}
    for path in request.embeddings:
        emb = load_embedding(path)
        embeddings[emb.name] = emb.vectors
        ti_hashes[emb.name] = _cached_hash(Path(path), "ti")
    seed = resolve_seed(request.seed)
    with GPU.job("generate", (request.prompt or "(empty prompt)")[:40]):
        loaded = MODELS.get(request.model, request.device, request.dtype)
        pipe = loaded.pipe
        stack = stack_for(pipe)
        try:
            report = stack.set(entries)
            for name, missing in report.unmatched.items():
                warnings.append(f"{name}: {len(missing)} module(s) not in this model were skipped "
                                f"(e.g. {missing[0]}).")
            images = txt2img(pipe, request.prompt, request.negative, request.steps, request.cfg, request.width,
                             request.height, seed, sampler, request.clip_skip, request.batch, callback, cancel,
                             embeddings)
        finally:
            # the model is shared with every tab: never leave adapters merged into it
            stack.clear()
    model_name, model_hash = _model_name_and_hash(loaded.source)
    width, height = images[0].size
    infotexts, paths = [], []
    for i in range(len(images)):
        params = GenerationParams(prompt=infotext_prompt, negative=request.negative, steps=request.steps,
                                  sampler=sampler, cfg=request.cfg, seed=seed + i, width=width, height=height,
                                  clip_skip=request.clip_skip, model=model_name, model_hash=model_hash,
                                  lora_hashes=lora_hashes, ti_hashes=ti_hashes)
        infotexts.append(format_infotext(params))
    if request.save:
        if request.out_file:
            out = Path(request.out_file).expanduser()
            paths = [out] + [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}") for i in range(1, len(images))]
        else:
            paths = _next_paths(_out_dir(request), len(images), seed)
        for image, text, path in zip(images, infotexts, paths):
            save_png(image, path, text)
    return GenerateResult(images, paths, infotexts, [seed + i for i in range(len(images))], warnings,
                          time.time() - t0)
