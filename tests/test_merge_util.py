"""Helpers shared by the merge tests (no tests here): random adapters on the tiny SD1 module shapes."""

from __future__ import annotations

import torch

# Modules of every sort on the tiny SD1: linear attention (complete q/k/v/out sets, as real files have and as
# diffusers' converter needs), 1x1-conv proj_in, ff, 3x3 convs, a conv shortcut, the text encoder.
_DB = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_"
_UB = "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_"
ATTN1 = [_DB + f"attn1_{p}" for p in ("to_q", "to_k", "to_v", "to_out_0")]
ATTN2 = [_DB + f"attn2_{p}" for p in ("to_q", "to_k", "to_v", "to_out_0")]
UP_ATTN = [_UB + f"attn1_{p}" for p in ("to_q", "to_k", "to_v", "to_out_0")]
TE = [f"lora_te_text_model_encoder_layers_0_{p}" for p in
      ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")]
TARGETS = ATTN1 + ATTN2 + UP_ATTN + TE + [
    _DB + "ff_net_0_proj", _UB + "ff_net_2",
    "lora_unet_down_blocks_0_attentions_0_proj_in",
    "lora_unet_down_blocks_0_resnets_0_conv1",
    "lora_unet_up_blocks_1_resnets_0_conv1",
    "lora_unet_down_blocks_1_resnets_0_conv_shortcut",
]
CONVS = {"lora_unet_down_blocks_0_resnets_0_conv1", "lora_unet_up_blocks_1_resnets_0_conv1"}


def weight_shapes(pipe, names=TARGETS) -> dict[str, tuple]:
    from studio.adapters.keymap import build_keymap

    kmap = build_keymap(pipe, "sd1")
    out = {}
    for n in names:
        comp, path = kmap.to_module(n)
        out[n] = tuple(getattr(pipe, comp).get_submodule(path).weight.shape)
    return out


def random_lora_modules(shapes: dict[str, tuple], rank: int, alpha: float, seed: int,
                        convs: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """kohya tensors of a random LoRA / LoCon (3x3 convs only if ``convs``)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if len(shape) == 4 and shape[2:] != (1, 1) and not convs:
            continue
        down = torch.randn(rank, *shape[1:], generator=g) / shape[1] ** 0.5
        up = torch.randn(shape[0], rank, *([1, 1] if len(shape) == 4 else []), generator=g) / rank ** 0.5
        out[name] = {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(float(alpha))}
    return out


def write_lora(path, modules, family="sd1", title=None, dtype=torch.float32):
    from studio.adapters import save_adapter

    return save_adapter(path, modules, family, None, {"ss_output_name": title or path.stem}, dtype)


def dense_deltas(path) -> dict[str, torch.Tensor]:
    """name -> dW (float64, flattened to [out, in*k*k]) of every module of an adapter file."""
    from studio.adapters import load_adapter

    f = load_adapter(path)
    out = {}
    for name, m in f.modules.items():
        shape = m.kind_impl.delta_shape(m.shapes)
        out[name] = m.delta(torch.zeros(shape)).double().reshape(shape[0], -1)
    return out


def weighted_sum(paths_weights) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for path, w in paths_weights:
        for name, d in dense_deltas(path).items():
            total[name] = total.get(name, 0) + w * d
    return total


def best_rank_k(m: torch.Tensor, k: int) -> torch.Tensor:
    """The best rank-k approximation by a dense float64 SVD (Eckart-Young), the reference."""
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())
