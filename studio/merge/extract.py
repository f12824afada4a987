"""Extract a LoRA from two checkpoints: ``dW = W_tuned - W_base``, best rank-k approximation per module.

Both files are read tensor by tensor. Modules are the LoRA targets (attention / transformer-block
layers and the text encoders' attention + MLP); the ResNet / sampler convs (LoCon targets) too when
``conv_rank`` is given. A module whose difference is below ``min_diff`` (largest absolute change) is
left out, so a fine-tune of the UNet alone gives a UNet-only LoRA. Here ``dW`` really is dense,
so each module takes one dense SVD (the only way to find its best rank-k approximation); the
factors are ``U_k sqrt(S_k)`` and ``sqrt(S_k) V_k^T`` with ``alpha = k`` (scale 1).
"""

from __future__ import annotations

from pathlib import Path

import torch

from studio.errors import StudioError
from studio.merge import blend as bl
from studio.merge import recipe as rc
from studio.merge.lora_merge import MergeResult
from studio.merge.stream import TensorReader


def extract(tuned, base, out, rank: int = 32, conv_rank: int | None = None, min_diff: float = 1e-6,
            dtype: torch.dtype = torch.float16, progress=None) -> MergeResult:
    from studio.adapters import save_adapter
    from studio.merge.ckptmap import checkpoint_targets
    from studio.models.family import base_family

    tuned, base, out = Path(tuned), Path(base), Path(out)
    if out.suffix.lower() != ".safetensors":
        raise StudioError(f"The output {out.name} must be a .safetensors file.", "Name it e.g. extracted.safetensors.")
    if rank < 1 or (conv_rank is not None and conv_rank < 1):
        raise StudioError("The rank must be 1 or more.", "Give --rank R with R >= 1.")
    with TensorReader(tuned) as rt, TensorReader(base) as rb:
        fam_t, targets = checkpoint_targets(rt.header)
        fam_b, _ = checkpoint_targets(rb.header)
        if base_family(fam_t) != base_family(fam_b):
            raise StudioError(f"{tuned.name} is {fam_t} but {base.name} is {fam_b}.",
                              "Extract from a fine-tune and the base model it was tuned from.")
        wanted = {n: t for n, t in targets.items()
                  if t.group in ("attn", "te") or (t.group == "conv" and conv_rank is not None)}
        modules = {}
        report = bl.BlendReport(base_family(fam_t))
        cache: dict[str, torch.Tensor] = {}  # the current key's difference (q/k/v share one tensor)
        names = sorted(wanted, key=lambda n: wanted[n].key)
        with torch.no_grad():
            for i, name in enumerate(names):
                t = wanted[name]
                if t.key not in rb.keys() or rt.info(t.key)[1] != rb.info(t.key)[1]:
                    continue
                if t.key not in cache:
                    cache.clear()
                    cache[t.key] = rt[t.key].float() - rb[t.key].float()
                d = cache[t.key]
                d = d[slice(*t.rows)] if t.rows else d
                if progress:
                    progress((i + 1) / len(names), name)
                if float(d.abs().max()) <= min_diff:
                    continue
                shape = tuple(d.shape)
                u, s, vh = bl.dense_svd(d.reshape(shape[0], -1))
                k = min(conv_rank if t.group == "conv" else rank, bl.numerical_rank(s, (shape[0], vh.shape[1])))
                if k == 0:
                    continue
                up, down = bl.split_svd(u, s, vh, k)
                modules[name] = bl.to_lora(up, down, shape, k)
                report.ranks[k] += 1
                total = float((s.double() ** 2).sum())
                report.min_kept_energy = min(report.min_kept_energy, float((s[:k].double() ** 2).sum()) / total)
        if not modules:
            raise StudioError(f"{tuned.name} and {base.name} do not differ in any adaptable layer.",
                              "Check that the first file is the fine-tune and the second its base model.")
        report.n_modules = len(modules)
        bl.unify_alpha(modules)
        recipe = rc.build_recipe("extract", [rc.input_entry(tuned, None, None, rt.header.metadata)],
                                 base=rc.input_entry(base, None, None, rb.header.metadata), rank=rank,
                                 conv_rank=conv_rank)
    meta = {"ss_output_name": out.stem, "modelspec.title": out.stem,
            "modelspec.description": f"LoRA extracted from {tuned.name} minus {base.name}"}
    meta.update(rc.recipe_metadata(recipe))
    save_adapter(out, modules, report.family, None, meta, dtype)
    return MergeResult(out, report, recipe)
