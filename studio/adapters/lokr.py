"""LoKr (LyCORIS): Kronecker product of two factors. Read by A1111 and ComfyUI.

Tensors: ``lokr_w1`` or ``lokr_w1_a`` + ``lokr_w1_b``; ``lokr_w2`` or ``lokr_w2_a`` + ``lokr_w2_b``;
optional ``lokr_t2`` (Tucker conv, ``w2_a [r, out2]``, ``w2_b [r, in2]``); ``alpha``.
dW = kron(w1, w2), scaled by alpha / r only when a factored ``_b`` exists (r = that ``_b``'s
``shape[0]``, w1's first); with two full factors the readers use scale 1, so a writer must bake
any scale into ``lokr_w1`` (``export_peft`` does).
"""

from __future__ import annotations

import torch

from studio.adapters.registry import AdapterKind, register


@register
class LoKr(AdapterKind):
    name = "lokr"
    keys = frozenset({"lokr_w1", "lokr_w1_a", "lokr_w2", "lokr_w2_a"})
    optional = frozenset({"lokr_w1_b", "lokr_w2_b", "lokr_t2"})

    def rank(self, shapes):
        for k in ("lokr_w1_b", "lokr_w2_b"):
            if k in shapes:
                return int(shapes[k][0])
        return None

    @staticmethod
    def _factor_shapes(shapes):
        w1 = shapes.get("lokr_w1") or (shapes["lokr_w1_a"][0], shapes["lokr_w1_b"][1])
        if "lokr_w2" in shapes:
            w2 = shapes["lokr_w2"]
        elif "lokr_t2" in shapes:
            w2 = (shapes["lokr_w2_a"][1], shapes["lokr_w2_b"][1], *shapes["lokr_t2"][2:])
        else:
            w2 = (shapes["lokr_w2_a"][0], shapes["lokr_w2_b"][1])
        return w1, w2

    def delta_shape(self, shapes):
        w1, w2 = self._factor_shapes(shapes)
        return (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])

    def delta(self, t, shape, alpha):
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        elif "lokr_t2" in t:
            w2 = torch.einsum("i j k l, i p, j r -> p r k l", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
        else:
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
        if w2.ndim == 4:
            w1 = w1[:, :, None, None]
        scale = self.scale({k: v.shape for k, v in t.items()}, alpha)
        return (torch.kron(w1.contiguous(), w2.contiguous()) * scale).reshape(shape)
