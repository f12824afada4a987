"""Bake adapters into a checkpoint: ``W' = W + sum_i w_i * dW_i(W)``, written as a new single file.

The base is read tensor by tensor and the output written tensor by tensor (``studio.merge.stream``),
so peak memory is about one tensor plus the adapters, not a second copy of the checkpoint. Each
adapter module is placed with ``studio.merge.ckptmap`` (SGM UNet keys, CLIP / open_clip text
encoders with packed q/k/v row slices). ``dW_i`` is the module's own ``delta`` against the *base*
weight (LoRA / LoCon / LoHa / LoKr / full / DoRA alike, as A1111 applies several networks), in
float32, then the sum is rounded once to the output dtype (fp16 by default). ``diff_b`` (full
adapters' bias change) goes into the matching bias.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from studio.errors import StudioError
from studio.fileio import legacy_hash
from studio.merge import blend as bl
from studio.merge import recipe as rc
from studio.merge.stream import ST_DTYPES, TORCH_TO_ST, TensorReader, trim_memory, write_streaming


def add_deltas(w: torch.Tensor, items: list, key: str) -> torch.Tensor:
    """``w`` (float32, modified in place) plus every ``coef * dW`` of ``items`` ((target, module, coef)).

    LoRA / LoCon modules on the same rows are added with one in-place ``addmm`` of their stacked
    factors (``A @ B = sum coef * scale * up @ down``, see ``studio.merge.blend``): no dense delta is
    allocated. Other kinds (and DoRA, which needs ``w``) add their own dense ``delta``.
    """
    by_rows: dict = {}
    dense = []  # every dense delta is taken against the base weight, before any is added
    for target, module, coef in items:
        rows = slice(*target.rows) if target.rows else slice(None)
        if key != target.key:  # the bias of a full (diff_b) module
            dense.append((rows, coef * module.tensors["diff_b"].float().reshape(-1)))
        elif module.kind_impl.name == "lora" and "dora_scale" not in module.shapes:
            by_rows.setdefault((target.rows,), []).append(bl.module_term(module, coef))
        else:
            dense.append((rows, coef * module.delta(w[rows])))
    for rows, d in dense:
        w[rows] += d
    for (rows,), terms in by_rows.items():
        a, b = bl.stack_factors(terms)
        view = (w[slice(*rows)] if rows else w).view(w.shape[0] if not rows else rows[1] - rows[0], -1)
        view.addmm_(a, b)
    return w


@dataclass
class BakeResult:
    path: Path
    n_modules: int
    n_tensors_changed: int
    recipe: dict

    def summary(self) -> str:
        return (f"Wrote {self.path.name}: {self.n_modules} adapter modules baked into {self.n_tensors_changed} "
                "checkpoint tensors.")


def bake(base, inputs: list[bl.MergeInput], out, dtype: torch.dtype | None = torch.float16,
         progress=None) -> BakeResult:
    """Add ``inputs`` (weighted, per-block weights honoured) into checkpoint ``base``; write ``out``."""
    from studio.models.family import base_family
    from studio.merge.ckptmap import checkpoint_targets

    base, out = Path(base), Path(out)
    if out.suffix.lower() != ".safetensors":
        raise StudioError(f"The output {out.name} must be a .safetensors file.", "Name it e.g. baked.safetensors.")
    if out.resolve() == base.resolve() or any(out.resolve() == Path(i.path).resolve() for i in inputs):
        raise StudioError(f"The output {out.name} is also an input.", "Choose another output name.")
    if base.suffix.lower() != ".safetensors":
        raise StudioError(f"{base.name} is not a .safetensors checkpoint.", "Convert it to .safetensors first.")
    files, lora_family = bl.load_inputs(inputs)
    with TensorReader(base) as reader:
        family, targets = checkpoint_targets(reader.header)
        if base_family(family) != lora_family:
            raise StudioError(f"{base.name} is a {family} checkpoint but the adapters are {lora_family}.",
                              "Bake adapters into a checkpoint of the family they were made for.")
        # checkpoint key -> [(target, module, coefficient)]
        plan: dict[str, list] = {}
        missing = []
        n_modules = 0
        for f, inp in zip(files, inputs):
            for name, module in f.modules.items():
                coef = inp.weight * bl.block_weight(name, inp.blocks)
                if coef == 0.0:
                    continue
                target = targets.get(name)
                if target is None:
                    missing.append(f"{inp.path.name}: {name}")
                    continue
                plan.setdefault(target.key, []).append((target, module, coef))
                if "diff_b" in module.shapes:
                    plan.setdefault(target.bias_key, []).append((target, module, coef))
                n_modules += 1
        if missing:
            raise StudioError(f"{len(missing)} adapter modules have no place in {base.name}: "
                              f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}.",
                              "The adapter was made for another model architecture.")

        def out_dtype(st_dtype: str) -> str:
            if dtype is None or st_dtype not in ("F32", "F16", "BF16", "F64"):
                return st_dtype
            return TORCH_TO_ST[dtype]

        entries = sorted(((k, out_dtype(reader.info(k)[0]), reader.info(k)[1]) for k in reader.keys()),
                         key=lambda e: reader.header.tensors[e[0]]["data_offsets"][0])

        def produce(key: str) -> torch.Tensor:
            t = reader[key]
            if key in plan:
                t = add_deltas(t.float(), plan[key], key)
                produced[0] += 1
                if produced[0] % 32 == 0:
                    trim_memory()
            return t.to(ST_DTYPES[out_dtype(reader.info(key)[0])])

        produced = [0]
        entries_in = [rc.input_entry(i.path, i.weight, i.blocks, f.metadata) for i, f in zip(inputs, files)]
        # The base is named by its legacy hash (64 KiB read) and the full hash it carries, if any:
        # hashing 2-7 GB again only to name it would cost more than the rest of the bake.
        base_entry = {"name": base.name, "size": base.stat().st_size, "sshs_legacy_hash": legacy_hash(base)}
        if reader.header.metadata.get("sshs_model_hash"):
            base_entry["sshs_model_hash"] = reader.header.metadata["sshs_model_hash"]
        if reader.header.metadata.get("modelspec.title"):
            base_entry["title"] = reader.header.metadata["modelspec.title"]
        recipe = rc.build_recipe("bake", entries_in, base=base_entry,
                                 dtype=str(dtype).replace("torch.", "") if dtype else "as base")
        meta = {k: v for k, v in reader.header.metadata.items() if not k.startswith(("sshs_", rc.RECIPE_KEY))}
        meta.update({"modelspec.title": out.stem})
        meta.update(rc.recipe_metadata(recipe))
        with torch.no_grad(), bl.small_ops_threads():
            # No sshs_* hash: that is the adapter convention; webUIs hash checkpoints themselves
            # (sha256 of the whole file), so a second pass over 2-7 GB would serve no reader.
            write_streaming(out, entries, produce, meta, progress)
    return BakeResult(out, n_modules, len(plan), recipe)
