"""Which Stable Diffusion family a model is: ``sd1``, ``sd2``, ``sd2-v`` or ``sdxl``.

Detection reads the file itself (the safetensors header's key names and shapes, a diffusers
folder's configs), never its file name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

FAMILIES = ("sd1", "sd2", "sd2-v", "sdxl")
FAMILY_LABELS = {"sd1": "SD 1.x", "sd2": "SD 2.x (epsilon)", "sd2-v": "SD 2.x (v-prediction)", "sdxl": "SDXL"}


def base_family(family: str) -> str:
    """``sd2-v`` and ``sd2`` share architecture and adapter layout."""
    return "sd2" if family.startswith("sd2") else family


def family_from_keys(keys, shapes: dict | None = None, metadata: dict | None = None,
                     yaml_text: str | None = None) -> str | None:
    """Family of a single-file checkpoint from its key names (plus shapes / metadata when known).

    Follows diffusers' own rule (SDXL has the open_clip bigG encoder at ``conditioner.embedders.1``,
    SD2 has an open_clip encoder or 1024-wide cross-attention) but checks whole key prefixes, so it
    also holds for small test models. v-prediction cannot be read from weights: it comes from the
    file's ``modelspec.prediction_type``, an A1111-style sibling ``.yaml`` (``parameterization: "v"``),
    or, as diffusers assumes, SD2 defaults to v-prediction (SD 2.x 768 models are the common ones).
    """
    keys = list(keys)
    metadata = metadata or {}
    if any(k.startswith("conditioner.embedders.1.model.") for k in keys):
        return "sdxl"
    is_sd2 = any(k.startswith("cond_stage_model.model.") for k in keys)
    v2_key = "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"
    if shapes and v2_key in shapes and shapes[v2_key][-1] == 1024:
        is_sd2 = True
    if is_sd2:
        pred = metadata.get("modelspec.prediction_type", "")
        if yaml_text is not None:
            return "sd2-v" if re.search(r"parameterization:\s*['\"]?v['\"]?", yaml_text) else "sd2"
        if pred:
            return "sd2-v" if pred.startswith("v") else "sd2"
        return "sd2-v"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return "sd1"
    return None


def family_of_diffusers_folder(folder: str | Path) -> str:
    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text())
    unet = json.loads((folder / "unet" / "config.json").read_text())
    if "text_encoder_2" in index or unet.get("addition_embed_type") == "text_time":
        return "sdxl"
    te = json.loads((folder / "text_encoder" / "config.json").read_text())
    sched_file = folder / "scheduler" / "scheduler_config.json"
    sched = json.loads(sched_file.read_text()) if sched_file.exists() else {}
    if unet.get("cross_attention_dim") == 1024 or te.get("hidden_act") == "gelu":
        return "sd2-v" if sched.get("prediction_type") == "v_prediction" else "sd2"
    return "sd1"
