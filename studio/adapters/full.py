"""Full delta (LyCORIS ``full``): ``diff`` is dW itself, ``diff_b`` the bias change. No rank, no alpha."""

from __future__ import annotations

from studio.adapters.registry import AdapterKind, register


@register
class Full(AdapterKind):
    name = "full"
    keys = frozenset({"diff"})
    optional = frozenset({"diff_b"})

    def delta_shape(self, shapes):
        return tuple(shapes["diff"])

    def delta(self, t, shape, alpha):
        return t["diff"].reshape(shape)

    def scale(self, shapes, alpha):
        return 1.0
