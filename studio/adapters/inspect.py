"""What an adapter file is, for the Inspect tab and ``python -m studio inspect``.

``inspect_file(path)`` reads only the header (and the few bytes of each ``alpha``); with
``deep=True`` it also reads every tensor to find NaN / Inf, compute the norm of each block's
delta (for the plot) and check the stored ``sshs_model_hash`` against the bytes.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter, defaultdict
from pathlib import Path

from studio.adapters import keymap as km
from studio.adapters.reader import AdapterFile, load_adapter
from studio.errors import StudioError

_UNET_DIFFUSERS = re.compile(r"lora_unet_(down_blocks_\d+_(attentions|resnets)_\d+_|down_blocks_\d+_downsamplers_0_conv$"
                             r"|mid_block_(attentions|resnets)_\d+_|up_blocks_\d+_(attentions|resnets)_\d+_"
                             r"|up_blocks_\d+_upsamplers_0_conv$|conv_in$|conv_out$|time_embedding_linear_[12]$)")
_UNET_SGM = re.compile(r"lora_unet_(input_blocks_\d+_\d+_|middle_block_\d+_|output_blocks_\d+_\d+_"
                       r"|time_embed_[02]$|label_emb_0_[02]$|out_2$|input_blocks_0_0$)")
_TE = re.compile(r"lora_te[12]?_text_model_encoder_layers_(\d+)_(self_attn_(q|k|v|out)_proj|mlp_fc[12])$")
CROSS = {"sd1": 768, "sd2": 1024, "sdxl": 2048}
TE_WIDTHS = {("sd1", "te1"): 768, ("sd2", "te1"): 1024, ("sdxl", "te1"): 768, ("sdxl", "te2"): 1280}
TRAINING_KEYS = ("ss_sd_model_name", "ss_resolution", "ss_num_train_images", "ss_steps", "ss_max_train_steps",
                 "ss_epoch", "ss_num_epochs", "ss_batch_size_per_device", "ss_learning_rate", "ss_unet_lr",
                 "ss_text_encoder_lr", "ss_optimizer", "ss_lr_scheduler", "ss_clip_skip", "ss_mixed_precision",
                 "ss_seed", "ss_noise_offset", "ss_training_started_at", "ss_training_finished_at",
                 "ss_output_name", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args")


def _json(value: str):
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        return None


def webui_maps(name: str, family: str | None) -> bool:
    """Would A1111 / ComfyUI map this module name to a layer of a ``family`` model?"""
    if name.startswith("lora_te"):
        return bool(_TE.match(name)) and (family == "sdxl" or not name.startswith(("lora_te1_", "lora_te2_")))
    if family == "sdxl":
        return bool(_UNET_SGM.match(name))
    if family in ("sd1", "sd2"):
        return bool(_UNET_DIFFUSERS.match(name))
    return bool(_UNET_SGM.match(name) or _UNET_DIFFUSERS.match(name))


def block_of(name: str) -> str:
    """Plot label of a module: UNet down / mid / up block, or text-encoder layer."""
    if (m := _TE.match(name)):
        part = "TE2" if name.startswith("lora_te2_") else "TE1" if name.startswith("lora_te1_") else "TE"
        return f"{part} layer {int(m[1]):02d}"
    for pat, label in ((r"lora_unet_down_blocks_(\d+)_", "down {}"), (r"lora_unet_input_blocks_(\d+)_", "in {:02d}"),
                       (r"lora_unet_up_blocks_(\d+)_", "up {}"), (r"lora_unet_output_blocks_(\d+)_", "out {:02d}")):
        if (m := re.match(pat, name)):
            return label.format(int(m[1]))
    if re.match(r"lora_unet_(mid_block|middle_block)_", name):
        return "mid"
    return "other"


def _order(label: str) -> tuple:
    rank = {"in": 0, "down": 0, "mid": 1, "out": 2, "up": 2, "TE": 3, "TE1": 3, "TE2": 4, "other": 5}
    head = label.split()[0]
    return (rank.get(head, 5), label)


def _summary(values: list) -> object:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    c = Counter(vals)
    return vals[0] if len(c) == 1 else {"mixed": True, "min": min(vals), "max": max(vals),
                                        "most_common": c.most_common(1)[0][0]}


def _warnings(f: AdapterFile) -> list[str]:
    w = []
    fam = f.family
    if f.unknown_keys:
        w.append(f"{len(f.unknown_keys)} tensor(s) no webUI reads, e.g. {', '.join(f.unknown_keys[:3])}.")
    if f.renamed:
        sgm = any(old.startswith("lora_unet_") and old != new for old, new in f.renamed) and f.family == "sdxl"
        hint = " (SDXL files need SGM block names: input_blocks / middle_block / output_blocks)" if sgm else ""
        w.append(f"{len(f.renamed)} module name(s) are spelled in a way webUIs do not map{hint} (e.g. "
                 f"{f.renamed[0][0]}); read as {f.renamed[0][1]}. Re-save the file with the studio to fix them.")
    bad = [n for n in f.modules if not webui_maps(n, fam)]
    if bad:
        hint = " (SDXL files need SGM block names: input_blocks / middle_block / output_blocks)" if fam == "sdxl" else ""
        w.append(f"{len(bad)} module name(s) no webUI would map{hint}, e.g. {bad[0]}.")
    if fam in ("sdxl", "sd2"):
        part_prefix = "lora_te2_" if fam == "sdxl" else "lora_te_"
        layers = defaultdict(set)
        for n in f.modules:
            if n.startswith(part_prefix) and (m := _TE.match(n)) and m[3]:
                layers[int(m[1])].add(m[3])
        partial = sorted(i for i, s in layers.items() if s != {"q", "k", "v", "out"})
        if partial:
            which = "second text encoder" if fam == "sdxl" else "text encoder"
            w.append(f"{which}: layer(s) {partial} lack some of q/k/v/out; A1111 silently skips those layers' attention.")
    no_alpha = [n for n, m in f.modules.items() if m.rank is not None and m.alpha is None]
    if no_alpha:
        w.append(f"{len(no_alpha)} module(s) have no alpha (readers then use scale 1 = alpha equal to rank), "
                 f"e.g. {no_alpha[0]}.")
    # A file made on the tiny demo model has its small widths by design: say so rather than alarm.
    tiny = " (expected: it was made on the tiny demo model)" if str(
        f.metadata.get("ss_sd_model_name", "")).startswith("tiny") else ""
    if fam in CROSS:
        for n, m in f.modules.items():
            width = _in_width(m)
            if re.search(r"attn2_to_[kv]$", n) and width and width != CROSS[fam]:
                w.append(f"{n} takes {width}-wide text features; a {fam} model has {CROSS[fam]}: "
                         f"the file does not fit the family{tiny}.")
                break
        for part in ("te1", "te2"):
            want = TE_WIDTHS.get((fam, part))
            for n, m in f.modules.items():
                if km.part_of(n) == part and n.endswith("self_attn_q_proj"):
                    width = _in_width(m)
                    if want and width and width != want:
                        w.append(f"{n} is {width} wide; the {fam} {part} is {want}: "
                                 f"the file does not fit the family{tiny}.")
                    break
    if f.metadata and not any(k in f.metadata for k in ("ss_base_model_version", "ss_v2")) and f.embedding is None:
        w.append("The metadata has neither ss_base_model_version nor ss_v2: A1111 lists this file as SD1 "
                 "(and hides it under an SDXL checkpoint).")
    if any("dora_scale" in m.shapes and m.shapes["dora_scale"][0] != 1 for m in f.modules.values()):
        w.append("DoRA scales are per output row (peft / ComfyUI convention); A1111 assumes per input column "
                 "and applies them differently.")
    return w


def _in_width(m) -> int | None:
    for k in ("lora_down.weight", "hada_w1_b", "diff"):
        if k in m.shapes and len(m.shapes[k]) >= 2 and "hada_t1" not in m.shapes:
            return int(m.shapes[k][1])
    return None


def _metadata_views(meta: dict[str, str]) -> dict:
    tags = Counter()
    for folder in (_json(meta.get("ss_tag_frequency", "")) or {}).values():
        if isinstance(folder, dict):
            for tag, n in folder.items():
                if isinstance(n, (int, float)):
                    tags[tag.strip()] += int(n)
    trigger = meta.get("modelspec.trigger_phrase", "")
    triggers = [t.strip() for t in re.split(r"[,\n]", trigger) if t.strip()]
    if not triggers and tags:
        triggers = [tags.most_common(1)[0][0]]
    return {
        "trigger_words": triggers,
        "tag_frequency": dict(tags.most_common(50)),
        "dataset_dirs": _json(meta.get("ss_dataset_dirs", "")) or {},
        "training": {k[3:]: meta[k] for k in TRAINING_KEYS if k in meta},
        "modelspec": {k[len("modelspec."):]: v for k, v in meta.items() if k.startswith("modelspec.")},
        "merge_recipe": _merge_recipe(meta),
    }


def _merge_recipe(meta: dict[str, str]) -> dict | None:
    """How a merged or baked file was made (inputs, their hashes, weights, method), if it says."""
    from studio.merge.recipe import read_recipe

    return read_recipe(meta)


def block_norms(f: AdapterFile) -> list[tuple[str, float]]:
    """Norm of the delta per block (UNet down / mid / up, text-encoder layers); reads the tensors."""
    sq = defaultdict(float)
    for n, m in f.modules.items():
        sq[block_of(n)] += m.delta_norm() ** 2
    return [(k, math.sqrt(v)) for k, v in sorted(sq.items(), key=lambda kv: _order(kv[0]))]


def inspect_file(path, deep: bool = False) -> dict:
    """The Inspect report of one file; header-only unless ``deep``. Raises StudioError for bad input."""
    f = load_adapter(path)
    meta = dict(f.metadata)
    stored_hash = meta.get("sshs_model_hash")
    report = {"path": str(Path(path)), "name": Path(path).stem, "kind": f.kind, "family": f.family,
              "family_source": f.family_source, "format": f.format, "dtype": f.dtype, "size": f.size,
              "n_tensors": f.n_tensors, "hash": stored_hash, "hash_source": "metadata" if stored_hash else None,
              "legacy_hash": meta.get("sshs_legacy_hash"), "metadata": meta}
    if f.embedding is not None:
        emb = f.embedding
        report.update(modules={"unet": 0, "te1": 0, "te2": 0}, rank=None, alpha=None, warnings=[],
                      embedding={"token": emb.name, "n_vectors": emb.n_vectors,
                                 "vectors": {k: list(v.shape) for k, v in emb.vectors.items()}})
        if f.format == "a1111-pt":
            report["warnings"].append("A pickle (.pt): it was opened with weights_only; prefer .safetensors.")
    else:
        if not f.modules:
            raise StudioError(f"{Path(path).name} holds no adapter weights: none of its {f.n_tensors} tensors "
                              f"is a LoRA / LyCORIS / embedding key (e.g. {', '.join(f.unknown_keys[:2])}).",
                              "Pick a LoRA, LyCORIS or embedding file; full checkpoints go in the model picker.")
        ranks = {n: m.rank for n, m in f.modules.items()}
        alphas = {n: m.alpha for n, m in f.modules.items()}
        report.update(modules=f.parts(), rank=_summary(list(ranks.values())),
                      alpha=_summary(list(alphas.values())),
                      kinds=dict(Counter(m.kind for m in f.modules.values())), warnings=_warnings(f))
        if isinstance(report["rank"], dict) or isinstance(report["alpha"], dict):
            report["per_module"] = {n: {"kind": f.modules[n].kind, "rank": ranks[n], "alpha": alphas[n]}
                                    for n in f.modules}
    report["short_hash"] = report["hash"][:12] if report["hash"] else None
    report.update(_metadata_views(meta))
    if deep:
        _deep(f, report)
    return report


def _deep(f: AdapterFile, report: dict) -> None:
    from studio.fileio import sshs_hashes

    bad = []
    tensors = f.embedding.vectors.items() if f.embedding is not None else f.state_dict().items()
    for key, t in tensors:
        if t.is_floating_point() and not bool(t.float().isfinite().all()):
            bad.append(key)
    if bad:
        report["warnings"].append(f"{len(bad)} tensor(s) hold NaN or Inf values, e.g. {bad[0]}: the file is broken.")
    if f.header is not None:
        actual, legacy = sshs_hashes(f.path)
        if report["hash"] and report["hash"] != actual:
            report["warnings"].append("The stored sshs_model_hash does not match the tensors (stale after an edit); "
                                      "A1111 shows the real one.")
        report.update(hash=actual, hash_source="computed", short_hash=actual[:12], legacy_hash=legacy)
    if f.embedding is None:
        report["block_norms"] = block_norms(f)


def format_report(r: dict) -> str:
    """Plain-text report for the CLI."""
    lines = [f"{r['name']}: {r['kind']} ({r['format']}), family {r['family'] or 'unknown'}"
             f"{' (from ' + r['family_source'] + ')' if r.get('family_source') else ''}",
             f"  size {r['size'] / 1e6:.1f} MB, {r['n_tensors']} tensors, dtype {r['dtype']}",
             f"  hash {r['short_hash'] or '-'} (A1111), legacy {r.get('legacy_hash') or '-'}"]
    if r.get("embedding"):
        e = r["embedding"]
        lines.append(f"  token '{e['token']}', {e['n_vectors']} vector(s): {e['vectors']}")
    else:
        mods = r["modules"]
        lines.append(f"  modules: UNet {mods['unet']}, TE1 {mods['te1']}, TE2 {mods['te2']}")
        lines.append(f"  rank {r['rank']}, alpha {r['alpha']}")
    if r["trigger_words"]:
        lines.append(f"  trigger words: {', '.join(r['trigger_words'])}")
    if r["training"]:
        lines.append("  training: " + ", ".join(f"{k}={v}" for k, v in r["training"].items()))
    if r.get("merge_recipe"):
        from studio.merge.recipe import describe_recipe

        lines.append("  merged: " + describe_recipe(r["merge_recipe"]).replace("\n", "\n          "))
    for k, v in r.get("block_norms") or []:
        lines.append(f"  |dW| {k:12} {v:.4g}")
    for w in r["warnings"]:
        lines.append(f"  warning: {w}")
    return "\n".join(lines)
