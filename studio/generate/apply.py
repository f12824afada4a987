"""Adapters applied the way AUTOMATIC1111 applies them: the delta added to the weights.

``AdapterStack(pipe)`` holds the pipeline's base weights for every tensor it touches (an exact
copy, in the tensor's own dtype, on the CPU as A1111 keeps them) and sets the pipeline to
``base + sum(multiplier * delta)`` for the requested stack. Each adapter's delta is computed
against the weight as the adapters before it left it (A1111's order; it matters only for DoRA).

- ``set([...])`` with a changed weight recomputes only the tensors whose stack of
  (adapter, multiplier) changed; the base model is never reloaded.
- ``clear()`` copies every backup back: the base weights are restored bit for bit, because
  the backups are the original tensors, never recomputed by subtracting a delta.

UNet modules get the UNet multiplier, text-encoder modules the text-encoder multiplier (the two
numbers of ``<lora:name:te:unet>``). Modules the model does not have are listed in ``unmatched``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from studio.errors import StudioError


@dataclass
class StackEntry:
    adapter: object  # studio.adapters.AdapterFile
    unet: float = 1.0
    te: float | None = None  # None: same as unet
    name: str = ""

    @property
    def te_weight(self) -> float:
        return self.unet if self.te is None else self.te


@dataclass
class ApplyReport:
    touched: int = 0  # tensors recomputed by this call
    restored: int = 0  # tensors put back to base
    unmatched: dict[str, list[str]] = field(default_factory=dict)  # adapter name -> module names not in the model


class AdapterStack:
    def __init__(self, pipe, family: str | None = None):
        from studio.adapters.keymap import build_keymap
        from studio.generate.prompt import pipe_family

        self.pipe = pipe
        self.family = family or pipe_family(pipe)
        self.keymap = build_keymap(pipe, self.family)
        self._backup: dict[tuple[str, str, str], object] = {}  # (component, module path, "weight"|"bias") -> tensor
        self._signature: dict[tuple, tuple] = {}  # tensor key -> ((id(adapter), multiplier), ...) now applied
        self.entries: list[StackEntry] = []

    # -- helpers ------------------------------------------------------------------------------
    def _module(self, component: str, path: str):
        return getattr(self.pipe, component).get_submodule(path)

    def _param(self, key):
        component, path, attr = key
        return getattr(self._module(component, path), attr)

    def _plan(self, entries: list[StackEntry], report: ApplyReport) -> dict[tuple, list]:
        """tensor key -> [(entry index, module, multiplier, kind)] in stack order."""
        plan: dict[tuple, list] = {}
        for i, e in enumerate(entries):
            missing = []
            for name, module in e.adapter.modules.items():
                if name not in self.keymap:
                    missing.append(name)
                    continue
                component, path = self.keymap.to_module(name)
                mult = e.unet if component == "unet" else e.te_weight
                if mult == 0:
                    continue
                plan.setdefault((component, path, "weight"), []).append((i, module, mult, "weight"))
                if "diff_b" in module.shapes:
                    plan.setdefault((component, path, "bias"), []).append((i, module, mult, "bias"))
            if missing:
                report.unmatched[e.name or str(getattr(e.adapter, "path", i))] = missing
        return plan

    # -- public -------------------------------------------------------------------------------
    def set(self, entries: list[StackEntry]) -> ApplyReport:
        """Make the pipeline's weights base + the given stack (in this order)."""
        import torch

        report = ApplyReport()
        for e in entries:
            fam = getattr(e.adapter, "family", None)
            if fam and fam != self.family and not (fam.startswith("sd2") and self.family.startswith("sd2")):
                raise StudioError(f"{e.name or e.adapter.path} is a {fam} adapter; the base model is {self.family}.",
                                  "Pick a base model of the adapter's family, or another adapter.")
        plan = self._plan(entries, report)
        new_sig = {key: tuple((id(entries[i].adapter), mult) for i, _m, mult, _k in items) for key, items in plan.items()}
        with torch.no_grad():
            # tensors no longer adapted: back to base, backup dropped
            for key in [k for k in self._backup if k not in plan]:
                self._param(key).data.copy_(self._backup.pop(key))
                self._signature.pop(key, None)
                report.restored += 1
            for key, items in plan.items():
                if self._signature.get(key) == new_sig[key]:
                    continue
                param = self._param(key)
                if key not in self._backup:
                    self._backup[key] = param.data.detach().to("cpu", copy=True)
                base = self._backup[key].to(param.device)
                if key[2] == "bias":
                    w = base.float()
                    for _i, module, mult, _k in items:
                        w = w + mult * module.tensors["diff_b"].to(w.device, torch.float32).reshape(w.shape)
                else:
                    w = base
                    for _i, module, mult, _k in items:
                        # in fp32 from the weight the previous adapter left, stored in the
                        # model's dtype after each adapter: A1111's order and rounding
                        w32 = w.float()
                        w = (w32 + mult * module.delta(w32)).to(param.dtype)
                param.data.copy_(w.to(param.dtype))
                self._signature[key] = new_sig[key]
                report.touched += 1
        self.entries = list(entries)
        return report

    def clear(self) -> ApplyReport:
        """Restore every touched tensor to its base value (bit for bit) and forget the stack."""
        return self.set([])

    @property
    def n_backed_up(self) -> int:
        return len(self._backup)


def stack_for(pipe) -> AdapterStack:
    """The one AdapterStack of a pipeline (kept on the pipeline object)."""
    stack = getattr(pipe, "_studio_adapter_stack", None)
    if stack is None:
        stack = AdapterStack(pipe)
        pipe._studio_adapter_stack = stack
    return stack
