"""The registry of adapter kinds, and the in-memory model of one adapted module.

Every kind (LoRA/LoCon, LoHa, LoKr, full ``diff``, DoRA on top of any of them) is a small
``AdapterKind`` subclass in its own file, registered here with ``@register``. A kind:

- recognises a module from the tensor-name suffixes it has (``lora_down.weight``, ``hada_w1_a`` ...);
- reports rank and shapes from the header alone (no tensor data needed);
- computes the weight delta ``dW`` for a target weight, as A1111 / ComfyUI apply it;
- writes itself back (``to_webui``: suffix -> tensor, in the kohya / LyCORIS layout).

Modules in a file are keyed by their webUI (kohya) name, e.g.
``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch

KINDS: list["AdapterKind"] = []
# LoCon targets: ResnetBlock2D / Downsample2D / Upsample2D layers (diffusers and SGM names)
LOCON_NAME = re.compile(r"_(resnets|downsamplers|upsamplers|in_layers|out_layers|emb_layers|skip_connection)_"
                        r"|_(conv_shortcut|time_emb_proj|skip_connection|op)$|output_blocks_\d+_[12]_conv$")


def register(cls):
    """Class decorator: add one instance of an AdapterKind to the registry (order = priority)."""
    KINDS.append(cls())
    return cls


class AdapterKind:
    """One adapter kind. Subclasses set ``name`` and ``keys`` and implement ``rank`` / ``delta``."""

    name: ClassVar[str] = ""
    keys: ClassVar[frozenset[str]] = frozenset()  # suffixes that identify the kind (any one of them)
    optional: ClassVar[frozenset[str]] = frozenset()  # other suffixes the kind reads

    def matches(self, suffixes: set[str]) -> bool:
        return bool(self.keys & suffixes)

    def known(self) -> frozenset[str]:
        return self.keys | self.optional | {"alpha", "dora_scale"}

    def rank(self, shapes: dict[str, tuple]) -> int | None:
        return None

    def delta(self, t: dict[str, torch.Tensor], shape: tuple, alpha: float | None) -> torch.Tensor:
        """dW (float32) before any DoRA step, reshaped to ``shape``; ``alpha`` None = scale 1."""
        raise NotImplementedError

    def delta_shape(self, shapes: dict[str, tuple]) -> tuple:
        """Shape of the target weight as far as the tensors alone tell it (for norms w/o a model)."""
        raise NotImplementedError

    def scale(self, shapes: dict[str, tuple], alpha: float | None) -> float:
        r = self.rank(shapes)
        return 1.0 if alpha is None or not r else float(alpha) / r


def kind_for(suffixes: set[str]) -> AdapterKind | None:
    for kind in KINDS:
        if kind.matches(suffixes):
            return kind
    return None


@dataclass
class AdapterModule:
    """One adapted layer: its webUI name, its kind and its tensors (loaded on first access).

    ``tensors`` maps suffix -> tensor in the kohya / LyCORIS layout (``lora_down.weight``,
    ``lora_up.weight``, ``alpha``, ``dora_scale``, ...) whatever layout the file used.
    """

    name: str
    kind_impl: AdapterKind
    shapes: dict[str, tuple]
    dtypes: dict[str, str] = field(default_factory=dict)
    _loader: Callable[[], dict[str, torch.Tensor]] | None = None
    _tensors: dict[str, torch.Tensor] | None = None
    _alpha: float | None = None
    _alpha_loaded: bool = False
    _alpha_loader: Callable[[], float | None] | None = None

    @property
    def base_kind(self) -> str:
        return self.kind_impl.name

    @property
    def kind(self) -> str:
        """``lora`` / ``locon`` / ``loha`` / ``lokr`` / ``full``, or ``dora`` when a ``dora_scale`` is present."""
        if "dora_scale" in self.shapes:
            return "dora"
        if self.kind_impl.name == "lora" and (self.is_conv() or LOCON_NAME.search(self.name)):
            return "locon"
        return self.kind_impl.name

    def is_conv(self) -> bool:
        """A kxk convolution (1x1 convs such as SD1's proj_in are plain LoRA targets)."""
        return any(len(s) == 4 and tuple(s[2:]) != (1, 1) for k, s in self.shapes.items()
                   if k not in ("dora_scale", "alpha", "lora_up.weight"))

    @property
    def rank(self) -> int | None:
        return self.kind_impl.rank(self.shapes)

    @property
    def alpha(self) -> float | None:
        """The module's alpha (None when the file has none: readers then use scale 1)."""
        if not self._alpha_loaded:
            if self._tensors is not None and "alpha" in self._tensors:
                self._alpha = float(self._tensors["alpha"].float().item())
            elif self._alpha_loader is not None:
                self._alpha = self._alpha_loader()
            self._alpha_loaded = True
        return self._alpha

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        if self._tensors is None:
            self._tensors = self._loader() if self._loader else {}
        return self._tensors

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight change this module makes to ``weight`` (alpha/rank applied, multiplier 1).

        For DoRA (``dora_scale`` present) it is ``W_dora - W``; see ``studio.adapters.dora``.
        Same shape, dtype and device as ``weight``.
        """
        from studio.adapters import dora

        t = {k: v.to(device=weight.device, dtype=torch.float32) for k, v in self.tensors.items()}
        dw = self.kind_impl.delta(t, tuple(weight.shape), self.alpha)
        if "dora_scale" in t:
            dw = dora.apply(weight.float(), dw, t["dora_scale"])
        return dw.to(weight.dtype)

    def delta_norm(self) -> float:
        """Frobenius norm of dW without a base weight (DoRA: of the underlying low-rank dW)."""
        t = {k: v.float() for k, v in self.tensors.items()}
        shape = self.kind_impl.delta_shape(self.shapes)
        return float(self.kind_impl.delta(t, shape, self.alpha).norm())
