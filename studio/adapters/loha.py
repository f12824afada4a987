"""LoHa (LyCORIS): Hadamard product of two low-rank products. Read by A1111 and ComfyUI.

Tensors: ``hada_w1_a [out, r]``, ``hada_w1_b [r, in*kh*kw]``, ``hada_w2_a``, ``hada_w2_b``, ``alpha``;
Tucker conv adds ``hada_t1`` / ``hada_t2 [r, r, kh, kw]`` with ``hada_w*_a [r, out]``, ``hada_w*_b [r, in]``.
dW = (w1a @ w1b) * (w2a @ w2b) * alpha / r, r = ``hada_w1_b.shape[0]`` (the peft / LyCORIS math).
"""

from __future__ import annotations

import torch

from studio.adapters.registry import AdapterKind, register


def _cp(t, wa, wb):
    return torch.einsum("i j k l, j r, i p -> p r k l", t, wb, wa)


@register
class LoHa(AdapterKind):
    name = "loha"
    keys = frozenset({"hada_w1_a"})
    optional = frozenset({"hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"})

    def rank(self, shapes):
        return int(shapes["hada_w1_b"][0])

    def delta_shape(self, shapes):
        if "hada_t1" in shapes:
            return (shapes["hada_w1_a"][1], shapes["hada_w1_b"][1], *shapes["hada_t1"][2:])
        return (shapes["hada_w1_a"][0], shapes["hada_w1_b"][1])

    def delta(self, t, shape, alpha):
        scale = self.scale({"hada_w1_b": t["hada_w1_b"].shape}, alpha)
        if "hada_t1" in t:
            dw = _cp(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"]) * _cp(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
        else:
            dw = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
        return (dw * scale).reshape(shape)
