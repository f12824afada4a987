"""File-level operations on LoRAs: blend N files into one, resize one to a lower rank.

Both read inputs header-first (``load_adapter``), do the maths in ``studio.merge.blend`` and write
with ``save_adapter`` (kohya layout, ``ss_*`` metadata for the result, recomputed ``sshs_*``
hashes) plus the merge recipe (``studio.merge.recipe``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from studio.errors import StudioError
from studio.merge import blend as bl
from studio.merge import recipe as rc


@dataclass
class MergeResult:
    path: Path
    report: bl.BlendReport
    recipe: dict

    def summary(self) -> str:
        return f"Wrote {self.path.name}: {self.report.summary()}."


def _check_output(out, inputs) -> Path:
    out = Path(out)
    if out.suffix.lower() != ".safetensors":
        raise StudioError(f"The output {out.name} must be a .safetensors file.", "Name it e.g. merged.safetensors.")
    for inp in inputs:
        if Path(inp).resolve() == out.resolve():
            raise StudioError(f"The output {out.name} is also an input.", "Choose another output name.")
    return out


def merge_adapters(inputs: list[bl.MergeInput], out, method: str = "concat", rank: int | None = None,
                   energy: float | None = None, dtype: torch.dtype = torch.float16, title: str | None = None,
                   progress=None) -> MergeResult:
    """Blend ``inputs`` (same family) into one webUI LoRA at ``out``; see ``studio.merge.blend``."""
    out = _check_output(out, [i.path for i in inputs])
    files, family = bl.load_inputs(inputs)
    modules, report = bl.blend_modules(files, inputs, method, rank, energy, family, progress)
    entries = [rc.input_entry(i.path, i.weight, i.blocks, f.metadata) for i, f in zip(inputs, files)]
    recipe = rc.build_recipe(method, entries, rank=rank if method == "svd" else None,
                             energy=energy if method == "svd" else None)
    title = title or out.stem
    meta = {"ss_output_name": title, "modelspec.title": title,
            "modelspec.description": f"Merge of {len(inputs)} adapters ({method}) by Adapter Studio",
            "ss_training_comment": rc.describe_recipe(recipe).replace("\n", "; ")}
    bases = {f.metadata.get("ss_sd_model_name") for f in files}
    if len(bases) == 1 and None not in bases:  # every input was trained on the same base: say which
        meta["ss_sd_model_name"] = bases.pop()
    meta.update(rc.recipe_metadata(recipe))
    from studio.adapters import save_adapter

    save_adapter(out, modules, family, None, meta, dtype)
    return MergeResult(out, report, recipe)


def resize_adapter(src, out, rank: int | None = None, energy: float | None = None,
                   dtype: torch.dtype = torch.float16, progress=None) -> MergeResult:
    """Re-rank one adapter to at most ``rank`` (or by ``energy``), keeping each module's scale alpha/r.

    A LoRA module ``s * U @ D`` becomes ``s * U' @ D'`` with ``U' @ D'`` the best rank-k
    approximation of ``U @ D`` (factored SVD) and ``alpha' = s * k``, so ``alpha'/k = alpha/r`` as
    kohya's resize does. LyCORIS modules (no factors) are converted from their dense delta with
    ``alpha = k`` (scale 1). Training metadata of the input is kept; rank, hashes and title are new.
    """
    from studio.adapters import save_adapter

    src = Path(src)
    out = _check_output(out, [src])
    if rank is None and energy is None:
        raise StudioError("Resize needs a rank or an energy fraction.", "Give --rank R.")
    files, family = bl.load_inputs([bl.MergeInput(src, 1.0)])
    f = files[0]
    modules = {}
    report = bl.BlendReport(family)
    names = sorted(f.modules)
    with torch.no_grad(), bl.small_ops_threads():
        for i, name in enumerate(names):
            term = bl.module_term(f.modules[name], 1.0, src.name)
            if term.dense is None:
                scale = term.coef
                term.coef = 1.0  # SVD of the unscaled product; the scale goes back into alpha
            else:
                scale = 1.0
            tensors, res = bl.combine([term], "svd", rank, energy, name)
            if progress:
                progress((i + 1) / len(names), name)
            if tensors is None:
                report.skipped.append(name)
                continue
            tensors["alpha"] = torch.tensor(float(scale * res.rank))
            modules[name] = tensors
            report.ranks[res.rank] += 1
            report.min_kept_energy = min(report.min_kept_energy, res.kept_energy)
    report.n_modules = len(modules)
    bl.unify_alpha(modules)
    recipe = rc.build_recipe("resize", [rc.input_entry(src, None, None, f.metadata)], rank=rank, energy=energy)
    keep = {k: v for k, v in f.metadata.items()
            if k.startswith("ss_") and k not in ("ss_network_dim", "ss_network_alpha", "ss_network_args",
                                                 "ss_network_module", "ss_output_name")}
    meta = dict(keep)
    meta.update({"ss_output_name": out.stem, "modelspec.title": out.stem})
    meta.update(rc.recipe_metadata(recipe))
    save_adapter(out, modules, family, None, meta, dtype)
    return MergeResult(out, report, recipe)
