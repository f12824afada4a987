"""Data for a run: dataset -> bucketed entries -> a deterministic batch order; latent and
text-embedding caches.

Data order is a pure function of (seed, epoch): every epoch's batch list is rebuilt from a
``random.Random`` seeded with both, so a resumed run replays exactly the order an uninterrupted
run would have seen. Latents are cached on disk under ``cache_dir()/latents/<vae fingerprint>``,
keyed by the image (path, size, mtime) and its bucket, so later runs on the same images and VAE
skip the VAE entirely.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass
from pathlib import Path

from studio.errors import StudioError


# ---- dataset (studio.dataset, with a minimal fallback while it is being written) -------------

def scan(path: str):
    try:
        from studio.dataset.scan import scan_dataset
    except ImportError:  # pragma: no cover - only before the dataset issue landed
        return _fallback_scan(path)
    return scan_dataset(path)


def load_image(path):
    try:
        from studio.dataset.images import load_image as _load
    except ImportError:  # pragma: no cover
        from PIL import Image

        return Image.open(path).convert("RGB")
    return _load(path)


def _fallback_scan(path: str):  # pragma: no cover
    from types import SimpleNamespace

    from PIL import Image

    root = Path(path)
    items = []
    for img in sorted(root.rglob("*")):
        if img.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
            continue
        sub = img.parent.name if img.parent != root else ""
        rep = int(sub.split("_", 1)[0]) if sub[:1].isdigit() and "_" in sub else 1
        cap = img.with_suffix(".txt")
        with Image.open(img) as im:
            size = im.size
        items.append(SimpleNamespace(image_path=img, caption=cap.read_text().strip() if cap.exists() else "",
                                     repeats=rep, subset=sub, is_reg=False, size=size))
    return SimpleNamespace(root=root, items=items, problems=[])


def caption_of(item) -> str:
    return getattr(item, "effective_caption", None) or item.caption or ""


def make_buckets_for(cfg):
    """Bucket shapes (w, h) for ``cfg``: the dataset issue's ``make_buckets``, else a square."""
    if not cfg.enable_buckets:
        return [(cfg.resolution, cfg.resolution)]
    min_side = min(cfg.min_bucket_side, cfg.resolution)
    max_side = cfg.max_bucket_side or cfg.resolution * 2
    try:
        from studio.dataset.buckets import make_buckets

        return [tuple(b) for b in make_buckets(cfg.resolution, step=cfg.bucket_step, min_side=min_side,
                                               max_side=max_side)]
    except ImportError:  # pragma: no cover
        return _fallback_buckets(cfg.resolution, cfg.bucket_step, min_side, max_side)


def _fallback_buckets(res, step, min_side, max_side):  # pragma: no cover
    area = res * res
    out = set()
    w = min_side
    while w <= max_side:
        h = min(max_side, (area // w) // step * step)
        if h >= min_side:
            out.add((w, h))
            out.add((h, w))
        w += step
    return sorted(out)


def pick_bucket(size, buckets):
    try:
        from studio.dataset.buckets import assign_bucket

        return tuple(assign_bucket(tuple(size), buckets))
    except ImportError:  # pragma: no cover
        w, h = size
        ar = w / max(h, 1)
        return min(buckets, key=lambda b: (abs(b[0] / b[1] - ar), -b[0] * b[1]))


@dataclass
class Entry:
    """One image as training sees it."""
    index: int
    path: Path
    caption: str
    size: tuple  # original (w, h)
    bucket: tuple  # (w, h) the image is resized / cropped to
    repeats: int
    weight: float  # loss weight (regularisation images: prior_loss_weight)


def build_entries(cfg) -> tuple[list[Entry], object]:
    ds = scan(cfg.dataset)
    if not ds.items:
        problems = "; ".join(f"{Path(p.path).name}: {getattr(p, 'reason', p)}" for p in list(getattr(ds, "problems", []))[:3])
        raise StudioError(f"The dataset {cfg.dataset} has no usable images" + (f" ({problems})." if problems else "."),
                          "Add .png/.jpg images (with .txt captions) to the folder, or fix the listed problems.")
    buckets = make_buckets_for(cfg)
    entries = []
    for i, item in enumerate(ds.items):
        size = tuple(item.size) if item.size and item.size[0] else load_image(item.image_path).size
        entries.append(Entry(i, Path(item.image_path), caption_of(item), size, pick_bucket(size, buckets),
                             max(1, int(item.repeats)), cfg.prior_loss_weight if item.is_reg else 1.0))
    return entries, ds


class BatchOrder:
    """Which entries form which batch, as a pure function of (seed, epoch).

    Each epoch lists every entry ``repeats`` times, groups by bucket, shuffles within buckets,
    cuts batches of ``batch_size`` (a bucket's last batch may be smaller), then shuffles the
    batches. Position (epoch, index) is all the state there is; with N processes each global
    micro-step takes N consecutive batches and process r uses the r-th.
    """

    def __init__(self, entries: list[Entry], batch_size: int, seed: int, world: int = 1, rank: int = 0):
        self.entries, self.batch_size, self.seed = entries, batch_size, seed
        self.world, self.rank = world, rank
        self.epoch, self.index = 0, 0
        self._cache: tuple[int, list] | None = None
        if len(self.batches(0)) < world:
            raise StudioError(f"The dataset makes {len(self.batches(0))} batches per epoch, fewer than the "
                              f"{world} training processes.", "Add images or repeats, or use fewer processes.")

    def batches(self, epoch: int) -> list[list[int]]:
        if self._cache and self._cache[0] == epoch:
            return self._cache[1]
        rng = random.Random(f"studio-data-{self.seed}-{epoch}")
        by_bucket: dict[tuple, list[int]] = {}
        for e in self.entries:
            by_bucket.setdefault(e.bucket, []).extend([e.index] * e.repeats)
        out = []
        for bucket in sorted(by_bucket):
            idx = by_bucket[bucket]
            rng.shuffle(idx)
            out += [idx[i:i + self.batch_size] for i in range(0, len(idx), self.batch_size)]
        rng.shuffle(out)
        self._cache = (epoch, out)
        return out

    def next(self) -> list[int]:
        batches = self.batches(self.epoch)
        if self.index + self.world > len(batches):
            self.epoch, self.index = self.epoch + 1, 0
            batches = self.batches(self.epoch)
        mine = batches[self.index + self.rank]
        self.index += self.world
        return mine

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def steps_per_epoch(self, accumulation: int = 1) -> int:
        return max(1, len(self.batches(0)) // (self.world * accumulation))


# ---- images -> pixels -----------------------------------------------------------------------

def image_to_pixels(path: Path, bucket: tuple):
    """(pixels [3,h,w] in [-1, 1], crop (top, left)): resize to cover the bucket, centre crop."""
    import numpy as np
    import torch
    from PIL import Image

    im = load_image(path)
    bw, bh = bucket
    scale = max(bw / im.width, bh / im.height)
    rw, rh = max(bw, round(im.width * scale)), max(bh, round(im.height * scale))
    if (rw, rh) != im.size:
        im = im.resize((rw, rh), Image.BICUBIC)
    left, top = (rw - bw) // 2, (rh - bh) // 2
    im = im.crop((left, top, left + bw, top + bh))
    arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous(), (top, left)


# ---- latent cache -------------------------------------------------------------------------

def vae_fingerprint(vae) -> str:
    """Identifies a VAE by config and a sample of its weights (cheap, and changes with any model)."""
    import torch

    h = hashlib.sha256(repr(sorted(dict(vae.config).items())).encode())
    params = list(vae.encoder.parameters()) + list(getattr(vae, "quant_conv", torch.nn.Identity()).parameters())
    for p in params[:4] + params[-4:]:
        h.update(p.detach().float().cpu().numpy().tobytes()[:65536])
    return h.hexdigest()[:20]


def _image_key(path: Path, bucket: tuple) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{bucket[0]}x{bucket[1]}".encode()).hexdigest()[:32]


class LatentCache:
    """Latents (already multiplied by the VAE scaling factor) per entry, in memory and on disk."""

    def __init__(self, vae, folder: Path | None, device, disk: bool = True):
        self.vae, self.device, self.disk = vae, device, disk
        self.folder = Path(folder) / vae_fingerprint(vae) if folder else None
        self.mem: dict[int, object] = {}
        self.crops: dict[int, tuple] = {}

    def encode(self, pixels):
        import torch

        vae = self.vae
        with torch.no_grad():
            dist = vae.encode(pixels.to(self.device, dtype=vae.dtype)).latent_dist
            return (dist.mode() * vae.config.scaling_factor).float()

    def fill(self, entries: list[Entry], batch: int = 4, progress=None) -> int:
        """Make sure every entry has a latent; returns how many were VAE-encoded (not on disk)."""
        import torch
        from safetensors.torch import load_file

        from studio.fileio import save_safetensors

        todo = []
        for e in entries:
            path = self.folder / f"{_image_key(e.path, e.bucket)}.safetensors" if self.folder else None
            if path is not None and self.disk and path.exists():
                try:
                    data = load_file(str(path))
                    self.mem[e.index] = data["latent"]
                    self.crops[e.index] = tuple(int(x) for x in data["crop"].tolist())
                    continue
                except Exception:  # unreadable cache file: encode again and overwrite
                    pass
            todo.append((e, path))
        by_bucket: dict[tuple, list] = {}
        for e, path in todo:
            by_bucket.setdefault(e.bucket, []).append((e, path))
        done = 0
        for group in by_bucket.values():
            for i in range(0, len(group), batch):
                chunk = group[i:i + batch]
                pix, crops = zip(*(image_to_pixels(e.path, e.bucket) for e, _ in chunk))
                lat = self.encode(torch.stack(pix)).cpu()
                for (e, path), one, crop in zip(chunk, lat, crops):
                    self.mem[e.index] = one.clone()
                    self.crops[e.index] = crop
                    if path is not None and self.disk:
                        save_safetensors(path, {"latent": one, "crop": torch.tensor(crop)})
                done += len(chunk)
                if progress:
                    progress(done, len(todo))
        return done

    def get(self, entries: list[Entry]):
        import torch

        return torch.stack([self.mem[e.index] for e in entries]), [self.crops[e.index] for e in entries]


# ---- captions and text encoders -----------------------------------------------------------

def process_caption(caption: str, rng: random.Random, cfg) -> str:
    """Caption dropout, then tag shuffle keeping the first ``keep_tokens`` tags in place."""
    if cfg.caption_dropout and rng.random() < cfg.caption_dropout:
        return ""
    if cfg.shuffle_tags and "," in caption:
        tags = [t.strip() for t in caption.split(",") if t.strip()]
        head, tail = tags[:cfg.keep_tokens], tags[cfg.keep_tokens:]
        rng.shuffle(tail)
        caption = ", ".join(head + tail)
    return caption


def encode_prompts(text_encoders: list, tokenizers: list, captions: list[str], clip_skip: int, device):
    """(hidden states [B, 77, D], pooled [B, P] or None), as the SD1/SD2/SDXL pipelines build them.

    SD1/SD2 (one encoder): the last layer, or with clip skip N the N-th from last through the
    final layer norm (A1111's convention). SDXL: the penultimate layer (further back with clip
    skip) of both encoders, concatenated, plus the second encoder's pooled projection.
    """
    import torch

    if len(text_encoders) == 1:
        te, tok = text_encoders[0], tokenizers[0]
        ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(device)
        out = te(ids, output_hidden_states=clip_skip > 1)
        if clip_skip <= 1:
            return out.last_hidden_state, None
        norm = getattr(te, "final_layer_norm", None) or te.text_model.final_layer_norm
        return norm(out.hidden_states[-clip_skip]), None
    hidden, pooled = [], None
    for te, tok in zip(text_encoders, tokenizers):
        ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(device)
        out = te(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-(clip_skip + 1)])
        pooled = getattr(out, "text_embeds", None)
        if pooled is None:
            pooled = out[0]
    return torch.cat(hidden, dim=-1), pooled


class TextCache:
    """Frozen text encoders' outputs per caption string, computed once."""

    def __init__(self):
        self.mem: dict[str, tuple] = {}

    def fill(self, captions, encode_fn, batch: int = 8) -> None:
        import torch

        todo = [c for c in dict.fromkeys(captions) if c not in self.mem]
        with torch.no_grad():
            for i in range(0, len(todo), batch):
                chunk = todo[i:i + batch]
                hidden, pooled = encode_fn(chunk)
                for j, c in enumerate(chunk):
                    self.mem[c] = (hidden[j].detach(), None if pooled is None else pooled[j].detach())

    def get(self, captions: list[str]):
        import torch

        hidden = torch.stack([self.mem[c][0] for c in captions])
        pooled = None if self.mem[captions[0]][1] is None else torch.stack([self.mem[c][1] for c in captions])
        return hidden, pooled


def latent_cache_dir() -> Path:
    from studio.places import cache_dir

    env = os.environ.get("STUDIO_LATENT_CACHE")
    return Path(env) if env else cache_dir() / "latents"  # (Path("") would be the current folder)
