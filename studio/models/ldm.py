"""Naming between diffusers modules and the original (LDM / SGM) layout the webUIs use.

Single-file checkpoints (what A1111, Forge and ComfyUI call a "model") and kohya LoRA names for
SDXL use the original block names. The map is computed from each module's name and the model's
own config (``layers_per_block``, which blocks have attention), never from a table of one model's
keys, so it holds for real models and for the tiny test models alike. Reading goes through
diffusers' own ``from_single_file``; this module only writes.
"""

from __future__ import annotations

import json
import re

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TE_PREFIXES = {
    # (family, which encoder) -> key prefix in a single-file checkpoint
    ("sd1", 1): "cond_stage_model.transformer.text_model.",
    ("sd2", 1): "cond_stage_model.model.",
    ("sdxl", 1): "conditioner.embedders.0.transformer.text_model.",
    ("sdxl", 2): "conditioner.embedders.1.model.",
}

_RESNET_PARTS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def unet_module_to_sgm(name: str, config) -> str:
    """Map a diffusers UNet module path to its SGM (original) path.

    ``down_blocks.1.attentions.0.proj_in`` -> ``input_blocks.4.1.proj_in`` for SD layouts with
    two layers per block. Raises KeyError for a name that has no original counterpart.
    """
    lpb = config["layers_per_block"] if isinstance(config, dict) else config.layers_per_block
    up_types = config["up_block_types"] if isinstance(config, dict) else config.up_block_types
    if isinstance(lpb, (list, tuple)):
        raise KeyError("per-block layers_per_block is not an SD layout")
    for src, dst in _TOP.items():
        if name == src or name.startswith(src + "."):
            return dst + name[len(src):]
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)(\..*)?$", name)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4] or ""
        block = 1 + (lpb + 1) * i + j
        return f"input_blocks.{block}.{0 if kind == 'resnets' else 1}" + _resnet_rest(kind, rest)
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv(\..*)?$", name)
    if m:
        return f"input_blocks.{(lpb + 1) * (int(m[1]) + 1)}.0.op" + (m[2] or "")
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)(\..*)?$", name)
    if m:
        kind, j, rest = m[1], int(m[2]), m[3] or ""
        return f"middle_block.{2 * j if kind == 'resnets' else 1}" + _resnet_rest(kind, rest)
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)(\..*)?$", name)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4] or ""
        block = (lpb + 1) * i + j
        return f"output_blocks.{block}.{0 if kind == 'resnets' else 1}" + _resnet_rest(kind, rest)
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv(\..*)?$", name)
    if m:
        i = int(m[1])
        has_attn = "CrossAttn" in up_types[i]
        return f"output_blocks.{(lpb + 1) * i + lpb}.{2 if has_attn else 1}.conv" + (m[2] or "")
    raise KeyError(name)


def _resnet_rest(kind: str, rest: str) -> str:
    if kind != "resnets" or not rest:
        return rest
    part, _, tail = rest[1:].partition(".")
    return "." + _RESNET_PARTS.get(part, part) + ("." + tail if tail else "")


def _vae_key(key: str, n_up: int) -> str:
    k = key
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", k)
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
    k = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
               lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.", k)
    k = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
               lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.upsample.", k)
    k = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.", k)
    k = re.sub(r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.mid.attn_1.", k)
    k = k.replace(".conv_norm_out.", ".norm_out.").replace(".conv_shortcut.", ".nin_shortcut.")
    k = re.sub(r"\.attn_1\.(to_q|to_k|to_v|to_out\.0|group_norm)\.",
               lambda m: ".attn_1." + {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
                                       "group_norm": "norm"}[m[1]] + ".", k)
    return k


def vae_to_ldm(state: dict) -> dict:
    n_up = 1 + max(int(m[1]) for k in state if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k)))
    out = {}
    for key, value in state.items():
        new = _vae_key(key, n_up)
        if ".attn_1." in new and new.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # linear -> 1x1 conv, as the original VAE stores it
        out[VAE_PREFIX + new] = value
    return out


def clip_to_ldm(state: dict, prefix: str) -> dict:
    """HF CLIP text model (either with or without the ``text_model.`` wrapper) -> ``prefix`` + keys."""
    out = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        k = key[len("text_model."):] if key.startswith("text_model.") else key
        if k.startswith("text_projection"):
            continue  # CLIP-L's projection is not part of the webUI checkpoint
        out[prefix + k] = value
    return out


def open_clip_to_ldm(state: dict, prefix: str) -> dict:
    """HF CLIP text model -> the open_clip layout (SD2 and the SDXL bigG encoder)."""
    out = {}
    s = {(k[len("text_model."):] if k.startswith("text_model.") else k): v for k, v in state.items()}
    layers = sorted({int(m[1]) for k in s if (m := re.match(r"encoder\.layers\.(\d+)\.", k))})
    for i in layers:
        p = f"encoder.layers.{i}."
        q = f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[q + f"attn.in_proj_{kind}"] = torch.cat([s[p + f"self_attn.{n}_proj.{kind}"] for n in "qkv"], 0)
            out[q + f"attn.out_proj.{kind}"] = s[p + f"self_attn.out_proj.{kind}"]
            out[q + f"ln_1.{kind}"] = s[p + f"layer_norm1.{kind}"]
            out[q + f"ln_2.{kind}"] = s[p + f"layer_norm2.{kind}"]
            out[q + f"mlp.c_fc.{kind}"] = s[p + f"mlp.fc1.{kind}"]
            out[q + f"mlp.c_proj.{kind}"] = s[p + f"mlp.fc2.{kind}"]
    out[prefix + "token_embedding.weight"] = s["embeddings.token_embedding.weight"]
    out[prefix + "positional_embedding"] = s["embeddings.position_embedding.weight"]
    out[prefix + "ln_final.weight"] = s["final_layer_norm.weight"]
    out[prefix + "ln_final.bias"] = s["final_layer_norm.bias"]
    if "text_projection.weight" in s:
        out[prefix + "text_projection"] = s["text_projection.weight"].T.contiguous()
    return out


def unet_to_ldm(unet) -> dict:
    out = {}
    for key, value in unet.state_dict().items():
        module, _, param = key.rpartition(".")
        out[UNET_PREFIX + unet_module_to_sgm(module, unet.config) + "." + param] = value
    return out


def pipeline_to_ldm(pipe, family: str, dtype: torch.dtype | None = torch.float16) -> dict:
    """All weights of an SD1 / SD2 / SDXL pipeline in the single-file webUI layout."""
    base = "sd2" if family.startswith("sd2") else family
    sd = unet_to_ldm(pipe.unet)
    sd.update(vae_to_ldm(pipe.vae.state_dict()))
    if base == "sd1":
        sd.update(clip_to_ldm(pipe.text_encoder.state_dict(), TE_PREFIXES[("sd1", 1)]))
    elif base == "sd2":
        sd.update(open_clip_to_ldm(pipe.text_encoder.state_dict(), TE_PREFIXES[("sd2", 1)]))
    elif base == "sdxl":
        sd.update(clip_to_ldm(pipe.text_encoder.state_dict(), TE_PREFIXES[("sdxl", 1)]))
        sd.update(open_clip_to_ldm(pipe.text_encoder_2.state_dict(), TE_PREFIXES[("sdxl", 2)]))
    else:
        raise ValueError(f"unknown family {family!r}")
    if dtype is not None:
        sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    return sd


def _cfg(config, key):
    return config[key] if isinstance(config, dict) else getattr(config, key)


def unet_block_prefixes(config) -> list[str]:
    """Every diffusers UNet block path (``down_blocks.1.attentions.0``, ``mid_block.resnets.1``, ...) a
    config implies, from its block types and layers per block alone: no model is built."""
    lpb = _cfg(config, "layers_per_block")
    down, up = _cfg(config, "down_block_types"), _cfg(config, "up_block_types")
    out = list(_TOP)
    for i, kind in enumerate(down):
        for j in range(lpb):
            out.append(f"down_blocks.{i}.resnets.{j}")
            if "CrossAttn" in kind:
                out.append(f"down_blocks.{i}.attentions.{j}")
        if i < len(down) - 1:
            out.append(f"down_blocks.{i}.downsamplers.0.conv")
    out += ["mid_block.resnets.0", "mid_block.resnets.1", "mid_block.attentions.0"]
    for i, kind in enumerate(up):
        for j in range(lpb + 1):
            out.append(f"up_blocks.{i}.resnets.{j}")
            if "CrossAttn" in kind:
                out.append(f"up_blocks.{i}.attentions.{j}")
        if i < len(up) - 1:
            out.append(f"up_blocks.{i}.upsamplers.0.conv")
    return out


def sgm_to_unet_module(sgm_path: str, config, _cache: dict = {}) -> str:  # noqa: B006 - per-config memo
    """Inverse of ``unet_module_to_sgm``: ``input_blocks.4.1.proj_in`` -> ``down_blocks.1.attentions.0.proj_in``.

    Built from ``unet_block_prefixes(config)`` mapped forward, so the two directions cannot disagree.
    Raises KeyError for a path outside the UNet's blocks.
    """
    key = json.dumps({k: _cfg(config, k) for k in ("layers_per_block", "down_block_types", "up_block_types")},
                     sort_keys=True)
    table = _cache.get(key)
    if table is None:
        table = sorted(((unet_module_to_sgm(p, config), p) for p in unet_block_prefixes(config)),
                       key=lambda e: -len(e[0]))  # longest SGM prefix first
        _cache[key] = table
    for sgm, diffusers_path in table:
        if sgm_path == sgm or sgm_path.startswith(sgm + "."):
            rest = sgm_path[len(sgm):]
            if ".resnets." in diffusers_path:  # in_layers.2 -> conv1, skip_connection -> conv_shortcut ...
                for name, sgm_name in _RESNET_PARTS.items():
                    if rest[1:] == sgm_name or rest[1:].startswith(sgm_name + "."):
                        return diffusers_path + "." + name + rest[1 + len(sgm_name):]
            return diffusers_path + rest
    raise KeyError(sgm_path)
