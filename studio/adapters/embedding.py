"""Textual-inversion embeddings, as the webUIs read them.

- SD1 / SD2: safetensors ``{"emb_params": [n_vectors, dim]}`` (kohya / A1111), or A1111's ``.pt``
  pickle ``{"string_to_token": {"*": 265}, "string_to_param": {"*": tensor}, "name", "step"}``
  (opened only with ``weights_only=True``), or diffusers' ``learned_embeds.bin`` ``{token: tensor}``.
- SDXL: safetensors ``{"clip_l": [n, 768], "clip_g": [n, 1280]}``.
The prompt token is the file's stem. diffusers: ``pipe.load_textual_inversion(path, token=stem)``;
for SDXL load ``clip_l`` into text_encoder / tokenizer and ``clip_g`` into text_encoder_2 / tokenizer_2.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from studio.errors import StudioError

WIDTH_FAMILY = {768: "sd1", 1024: "sd2"}
ARCH = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sdxl": "stable-diffusion-xl-v1-base"}


@dataclass
class Embedding:
    name: str
    vectors: dict[str, torch.Tensor]
    family: str | None
    format: str = "kohya"
    metadata: dict[str, str] = field(default_factory=dict)
    path: Path | None = None

    @property
    def n_vectors(self) -> int:
        return int(next(iter(self.vectors.values())).shape[0])


def _family(vectors: dict, metadata: dict | None = None) -> str | None:
    from studio.adapters.reader import family_from_metadata

    fam = family_from_metadata(metadata or {})
    if fam:
        return fam
    if "clip_g" in vectors:
        return "sdxl"
    v = vectors.get("emb_params")
    return WIDTH_FAMILY.get(int(v.shape[-1])) if v is not None else None



def embedding_from_header(header) -> Embedding:
    from studio.adapters.reader import read_tensors

    vectors = read_tensors(header, list(header.tensors))  # a few KB at most
    fmt = "webui-sdxl" if "clip_g" in vectors else "kohya"
    for k, v in vectors.items():
        if v.ndim == 1:
            vectors[k] = v[None]
    return Embedding(name=header.path.stem, vectors=vectors, family=_family(vectors, header.metadata),
                     format=fmt, metadata=header.metadata, path=header.path)


def embedding_from_a1111(path: Path, obj: dict) -> Embedding:
    params = obj.get("string_to_param") or {}
    tensors = [v for v in params.values() if isinstance(v, torch.Tensor)]
    if not tensors:
        raise StudioError(f"{path.name} is an A1111 embedding with no vectors.", "The file is corrupt.")
    vec = tensors[0].detach().float()
    if vec.ndim == 1:
        vec = vec[None]
    vectors = {"emb_params": vec}
    meta = {k: str(obj[k]) for k in ("name", "step", "sd_checkpoint", "sd_checkpoint_name") if obj.get(k) is not None}
    return Embedding(name=path.stem, vectors=vectors, family=_family(vectors), format="a1111-pt", metadata=meta,
                     path=path)


def embedding_from_single(path: Path, obj: dict) -> Embedding:
    vec = next(iter(obj.values())).detach().float()
    vectors = {"emb_params": vec[None] if vec.ndim == 1 else vec}
    return Embedding(name=path.stem, vectors=vectors, family=_family(vectors), format="diffusers-bin", path=path)


def load_embedding(path) -> Embedding:
    """Read a textual-inversion file (any layout above); raises StudioError if it is not one."""
    from studio.adapters.reader import load_adapter

    f = load_adapter(path)
    if f.embedding is None:
        raise StudioError(f"{Path(path).name} is not a textual-inversion embedding (it is a {f.kind} adapter).",
                          "Pick an embedding file (emb_params, or clip_l + clip_g for SDXL).")
    return f.embedding


def save_embedding(path, vectors: dict[str, torch.Tensor], family: str, metadata: dict | None = None,
                   dtype: torch.dtype | None = None) -> Path:
    """Write an embedding in the webUI layout: ``emb_params`` (SD1/SD2) or ``clip_l`` + ``clip_g`` (SDXL)."""
    from datetime import datetime, timezone

    from studio.fileio import save_safetensors
    from studio.models.family import base_family

    fam = base_family(family)
    want = {"clip_l", "clip_g"} if fam == "sdxl" else {"emb_params"}
    if set(vectors) != want:
        raise StudioError(f"A {fam} embedding needs exactly the tensors {sorted(want)}, got {sorted(vectors)}.",
                          "SD1/SD2 embeddings hold 'emb_params'; SDXL ones 'clip_l' and 'clip_g'.")
    out = {}
    for k, v in vectors.items():
        v = v.detach().cpu()
        if v.ndim == 1:
            v = v[None]
        out[k] = v.to(dtype) if dtype is not None else v
    p = Path(path)
    meta = {"modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": f"{ARCH[fam]}/textual-inversion",
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if fam == "sdxl"
            else "diffusers", "modelspec.title": p.stem,
            "modelspec.date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
            "ss_base_model_version": {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}[fam],
            "ss_v2": str(fam == "sd2")}
    meta.update({str(k): (v if isinstance(v, str) else __import__("json").dumps(v)) for k, v in (metadata or {}).items()})
    return save_safetensors(p, out, meta)
