"""Where each webUI adapter module lives in a single-file (webUI layout) checkpoint.

- UNet: each ``model.diffusion_model.<SGM path>.weight`` of the checkpoint is mapped back to its
  diffusers path with the UNet config (embedded in tiny single files as ``studio.configs``, else the
  studio's shipped ``configs/<family>/unet``; ``ldm.sgm_to_unet_module``), which gives the webUI name
  (``keymap.to_webui_name``).
- Text encoders, CLIP layout (SD1, SDXL te1): ``<prefix>encoder.layers.N.self_attn.q_proj.weight``;
  open_clip layout (SD2, SDXL te2): q / k / v are row slices of ``transformer.resblocks.N.attn.in_proj_weight``,
  ``out_proj`` -> ``attn.out_proj``, ``fc1`` -> ``mlp.c_fc``, ``fc2`` -> ``mlp.c_proj``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from studio.errors import StudioError


@dataclass(frozen=True)
class Target:
    """A module's weight in the checkpoint: tensor ``key``, rows ``rows`` of it (packed q/k/v), its group."""

    key: str
    rows: tuple[int, int] | None = None
    group: str = "attn"  # attn (LoRA targets) | conv (LoCon targets) | te | other

    @property
    def bias_key(self) -> str:
        return self.key[:-len("weight")] + "bias" if self.key.endswith("weight") else self.key + "_bias"


def unet_config(header, family: str) -> dict:
    from studio.models.loader import CONFIG_ROOT
    from studio.tiny import EMBEDDED_CONFIG_KEY

    embedded = header.metadata.get(EMBEDDED_CONFIG_KEY)
    if embedded:
        files = json.loads(embedded)
        if "unet/config.json" in files:
            return json.loads(files["unet/config.json"])
    path = CONFIG_ROOT / family / "unet" / "config.json"
    if not path.exists():
        raise StudioError(f"No UNet config for the {family} family.", "Use an SD1, SD2 or SDXL checkpoint.")
    return json.loads(path.read_text())


def checkpoint_family(header) -> str:
    from studio.models.family import family_from_keys

    shapes = {k: tuple(v["shape"]) for k, v in header.tensors.items()}
    fam = family_from_keys(header.tensors.keys(), shapes, header.metadata)
    if fam is None:
        raise StudioError(f"{Path(header.path).name} is not a Stable Diffusion checkpoint (no UNet weights found).",
                          "Pick a single-file SD1 / SD2 / SDXL checkpoint (.safetensors).")
    return fam


def _unet_targets(shapes: dict[str, tuple], config: dict, family: str) -> dict[str, Target]:
    """Every Linear / Conv weight of the checkpoint's UNet, by webUI name.

    Read from the checkpoint's own keys (SGM paths) mapped back to diffusers paths with the config
    alone, so no diffusers model is built (importing diffusers cost seconds per bake).
    """
    from studio.adapters.keymap import to_webui_name
    from studio.models.ldm import UNET_PREFIX, sgm_to_unet_module

    out = {}
    for key, shape in shapes.items():
        if not (key.startswith(UNET_PREFIX) and key.endswith(".weight")) or len(shape) < 2:
            continue  # norms and biases are not adapter targets
        try:
            path = sgm_to_unet_module(key[len(UNET_PREFIX):-len(".weight")], config)
            name = to_webui_name("unet", path, family, config)
        except KeyError:
            continue
        group = "attn" if ".attentions." in path else (
            "conv" if re.search(r"\.(resnets|downsamplers|upsamplers)\.", path) else "other")
        out[name] = Target(key, None, group)
    return out


_CLIP_PARTS = {"self_attn.q_proj": "self_attn_q_proj", "self_attn.k_proj": "self_attn_k_proj",
               "self_attn.v_proj": "self_attn_v_proj", "self_attn.out_proj": "self_attn_out_proj",
               "mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2"}
_OPEN_CLIP_PARTS = {"attn.out_proj": "self_attn_out_proj", "mlp.c_fc": "mlp_fc1", "mlp.c_proj": "mlp_fc2"}


def _te_targets(shapes: dict[str, tuple], prefix: str, open_clip: bool, webui_prefix: str) -> dict[str, Target]:
    out = {}
    if not open_clip:
        pat = re.compile(re.escape(prefix) + r"encoder\.layers\.(\d+)\.(self_attn\.[qkv]_proj|self_attn\.out_proj|"
                                              r"mlp\.fc[12])\.weight$")
        for key in shapes:
            if m := pat.match(key):
                out[f"{webui_prefix}text_model_encoder_layers_{m[1]}_{_CLIP_PARTS[m[2]]}"] = Target(key, None, "te")
        return out
    pat = re.compile(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.(attn\.in_proj_weight|attn\.out_proj\.weight|"
                                          r"mlp\.c_fc\.weight|mlp\.c_proj\.weight)$")
    for key, shape in shapes.items():
        if not (m := pat.match(key)):
            continue
        base = f"{webui_prefix}text_model_encoder_layers_{m[1]}_"
        if m[2] == "attn.in_proj_weight":
            d = shape[0] // 3
            for i, part in enumerate("qkv"):
                out[base + f"self_attn_{part}_proj"] = Target(key, (i * d, (i + 1) * d), "te")
        else:
            out[base + _OPEN_CLIP_PARTS[m[2][:-len(".weight")]]] = Target(key, None, "te")
    return out


def checkpoint_targets(header, family: str | None = None) -> tuple[str, dict[str, Target]]:
    """``(family, {webUI name: Target})`` for a single-file checkpoint's header; only keys it has."""
    from studio.models.family import base_family
    from studio.models.ldm import TE_PREFIXES

    family = family or checkpoint_family(header)
    base = base_family(family)
    shapes = {k: tuple(v["shape"]) for k, v in header.tensors.items()}
    targets = _unet_targets(shapes, unet_config(header, family), base)
    if base == "sd1":
        targets.update(_te_targets(shapes, TE_PREFIXES[("sd1", 1)], False, "lora_te_"))
    elif base == "sd2":
        targets.update(_te_targets(shapes, TE_PREFIXES[("sd2", 1)], True, "lora_te_"))
    else:
        targets.update(_te_targets(shapes, TE_PREFIXES[("sdxl", 1)], False, "lora_te1_"))
        targets.update(_te_targets(shapes, TE_PREFIXES[("sdxl", 2)], True, "lora_te2_"))
    return family, targets
