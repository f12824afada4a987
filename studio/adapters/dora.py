"""DoRA: a ``dora_scale`` tensor beside LoRA / LoHa / LoKr keys (weight decomposition).

    W' = dora_scale * (W + dW) / ||W + dW||      (norm along one axis)

Axis convention the studio WRITES: the output axis, as peft trains it (``lora_magnitude_vector``
has one value per output row; the norm is taken over every dim but 0). On disk ``dora_scale`` is
``[out, 1]`` (Linear) or ``[out, 1, 1, 1]`` (Conv) — LyCORIS's ``wd_on_out`` layout, which ComfyUI
detects by ``dora_scale.shape[0] == W.shape[0]`` and diffusers maps to ``lora_magnitude_vector``.

Reading accepts both layouts: ``[out, 1, ...]`` normalises per output row, ``[1, in, ...]``
(LyCORIS' default and what A1111 assumes) per input column. A1111 always uses the input-column
math, so it misapplies output-axis files; ``inspect`` says so.
"""

from __future__ import annotations

import torch


def output_axis(dora_scale: torch.Tensor, weight_shape) -> bool:
    """True when ``dora_scale`` holds one value per output row."""
    if dora_scale.ndim == 1:
        return True
    return dora_scale.shape[0] == weight_shape[0] and (dora_scale.ndim < 2 or dora_scale.shape[1] == 1)


def apply(weight: torch.Tensor, dw: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """W_dora - W for base ``weight``, low-rank ``dw`` (already scaled) and ``dora_scale``."""
    merged = weight + dw
    if output_axis(dora_scale, weight.shape):
        norm = merged.flatten(1).norm(dim=1).reshape(-1, *[1] * (weight.ndim - 1))
        mag = dora_scale.reshape(-1, *[1] * (weight.ndim - 1))
    else:
        norm = merged.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (weight.ndim - 2))
        mag = dora_scale.reshape(1, -1, *[1] * (weight.ndim - 2))
    return merged * (mag / norm) - weight


def to_file_layout(magnitude: torch.Tensor, weight_ndim: int) -> torch.Tensor:
    """peft ``lora_magnitude_vector`` ``[out]`` -> ``dora_scale`` ``[out, 1(, 1, 1)]``."""
    return magnitude.reshape(-1, *[1] * (weight_ndim - 1))
