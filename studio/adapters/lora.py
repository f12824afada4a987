"""LoRA and LoCon, kohya layout — what every webUI reads.

Per module: ``lora_down.weight`` ``[r, in]`` / ``[r, in, kh, kw]``, ``lora_up.weight`` ``[out, r]`` /
``[out, r, 1, 1]``, optional ``alpha`` (0-dim; scale = alpha / r, none = 1), optional
``lora_mid.weight`` ``[r, r, kh, kw]`` (LoCon Tucker, read by A1111 and ComfyUI).
dW = scale * up @ down; a kxk conv composes as ``conv2d(down.permute(1,0,2,3), up).permute(1,0,2,3)``.
"""

from __future__ import annotations

import torch

from studio.adapters.registry import AdapterKind, register


@register
class LoRA(AdapterKind):
    name = "lora"
    keys = frozenset({"lora_down.weight"})
    optional = frozenset({"lora_up.weight", "lora_mid.weight"})

    def rank(self, shapes):
        return int(shapes["lora_down.weight"][0])

    def delta_shape(self, shapes):
        down, up = shapes["lora_down.weight"], shapes["lora_up.weight"]
        if "lora_mid.weight" in shapes:
            return (up[0], down[1], *shapes["lora_mid.weight"][2:])
        return (up[0], *down[1:])

    def delta(self, t, shape, alpha):
        down, up = t["lora_down.weight"], t["lora_up.weight"]
        scale = self.scale({"lora_down.weight": down.shape}, alpha)
        if "lora_mid.weight" in t:
            dw = torch.einsum("ijkl,jr,pi->prkl", t["lora_mid.weight"], down.flatten(1), up.flatten(1))
        elif down.ndim == 4 and down.shape[2:] != (1, 1):
            dw = torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
        else:
            dw = up.flatten(1) @ down.flatten(1)
        return (dw * scale).reshape(shape)


def from_factors(down: torch.Tensor, up: torch.Tensor, alpha: float, mid: torch.Tensor | None = None) -> dict:
    """The kohya tensors for one module (``alpha`` as a 0-dim tensor)."""
    out = {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(float(alpha))}
    if mid is not None:
        out["lora_mid.weight"] = mid
    return out
