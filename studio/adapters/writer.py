"""Writing adapters in the kohya / LyCORIS layout every webUI reads.

``save_adapter`` writes ``NAME.suffix`` tensors (fp16 by default; ``alpha`` kept as a float32
0-dim tensor so ``alpha / r`` is exact), the minimum kohya metadata (``ss_network_module``,
``ss_network_dim``, ``ss_network_alpha``, ``ss_network_args``, ``ss_v2``,
``ss_base_model_version``) plus every training fact given, SAI ``modelspec.*``, and
``sshs_model_hash`` / ``sshs_legacy_hash`` computed the way kohya does (model hash over the
tensor bytes; legacy hash over a serialisation holding only the ``ss_*`` metadata).

``export_peft`` turns peft-adapted components (LoRA / DoRA / LoHa / LoKr) into that layout.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import torch

from studio.adapters import dora
from studio.adapters.registry import AdapterModule, kind_for
from studio.errors import StudioError

BASE_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
ARCH = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sdxl": "stable-diffusion-xl-v1-base"}
RESOLUTION = {"sd1": "512x512", "sd2": "512x512", "sdxl": "1024x1024"}
KINDS = ("lora", "locon", "loha", "lokr", "dora", "full", "mixed")


def _network_module_and_args(kind: str, modules: dict) -> tuple[str, dict]:
    if kind in ("lora", "locon"):
        args = {}
        convs = [m for m in modules.values() if m.get("lora_down.weight") is not None
                 and m["lora_down.weight"].ndim == 4 and m["lora_down.weight"].shape[2:] != (1, 1)]
        if convs:
            ranks = Counter(int(m["lora_down.weight"].shape[0]) for m in convs)
            alphas = Counter(float(m["alpha"]) for m in convs if "alpha" in m)
            args = {"conv_dim": str(ranks.most_common(1)[0][0])}
            if alphas:
                args["conv_alpha"] = _num(alphas.most_common(1)[0][0])
        return "networks.lora", args
    if kind == "dora":
        return "lycoris.kohya", {"algo": "lora", "dora_wd": "True", "wd_on_output": "True"}
    return "lycoris.kohya", {"algo": kind if kind != "mixed" else "mixed"}


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _rank_of(suffixes: dict[str, torch.Tensor]) -> int | None:
    k = kind_for(set(suffixes))
    return k.rank({s: tuple(t.shape) for s, t in suffixes.items()}) if k else None


def build_metadata(modules: dict[str, dict[str, torch.Tensor]], family: str, kind: str, title: str,
                   extra: dict | None = None) -> dict[str, str]:
    """Metadata for a kohya-layout file: minimum ``ss_*`` set, training facts, ``modelspec.*``."""
    extra = {str(k): (v if isinstance(v, str) else json.dumps(v)) for k, v in (extra or {}).items()}
    ranks = Counter(r for m in modules.values() if (r := _rank_of(m)) is not None)
    alphas = Counter(float(m["alpha"]) for m in modules.values() if "alpha" in m)
    net_module, net_args = _network_module_and_args(kind, modules)
    dim = ranks.most_common(1)[0][0] if ranks else 0
    meta = {
        "ss_network_module": net_module,
        "ss_network_dim": str(dim),
        "ss_network_alpha": _num(alphas.most_common(1)[0][0]) if alphas else str(dim),
        "ss_network_args": json.dumps(net_args),
        "ss_v2": str(family == "sd2"),
        "ss_base_model_version": BASE_VERSION[family],
    }
    if "ss_output_name" not in extra:
        meta["ss_output_name"] = title
    meta.update({k: v for k, v in extra.items() if not k.startswith("sshs_")})
    meta.setdefault("modelspec.sai_model_spec", "1.0.1")
    meta["modelspec.architecture"] = f"{ARCH[family]}/lora"
    meta.setdefault("modelspec.implementation", "https://github.com/Stability-AI/generative-models"
                    if family in ("sdxl", "sd2") else "diffusers")
    meta.setdefault("modelspec.title", extra.get("ss_output_name", title))
    meta.setdefault("modelspec.date", datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"))
    res = extra.get("ss_resolution", "")
    nums = [int(x) for x in __import__("re").findall(r"\d+", res)][:2]
    meta.setdefault("modelspec.resolution", f"{nums[0]}x{nums[-1]}" if nums else RESOLUTION[family])
    return meta


def _hashes(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as kohya's ``precalculate_safetensors_hashes``."""
    from safetensors.torch import save

    blob = save(tensors, {k: v for k, v in meta.items() if k.startswith("ss_")})
    (n,) = struct.unpack("<Q", blob[:8])
    model_hash = hashlib.sha256(blob[8 + n:]).hexdigest()
    b = io.BytesIO(blob)
    b.seek(0x100000)
    legacy = hashlib.sha256(b.read(0x10000)).hexdigest()[:8]
    return model_hash, legacy


def save_adapter(path, modules: dict[str, dict[str, torch.Tensor]], family: str, kind: str | None = None,
                 metadata: dict | None = None, dtype: torch.dtype = torch.float16) -> Path:
    """Write ``modules`` (webUI name -> {suffix: tensor}) as one kohya-layout safetensors file."""
    from studio.adapters.reader import file_kind
    from studio.fileio import save_safetensors
    from studio.models.family import base_family

    family = base_family(family) if family else family
    if family not in BASE_VERSION:
        raise StudioError(f"Unknown model family {family!r} for an adapter.", "Use sd1, sd2 or sdxl.")
    if not modules:
        raise StudioError("There is nothing to save: the adapter has no modules.",
                          "Check that the model was adapted (peft layers present) before exporting.")
    tensors: dict[str, torch.Tensor] = {}
    kinds = []
    for name, parts in modules.items():
        if not name.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")):
            raise StudioError(f"{name!r} is not a webUI module name.", "Names start with lora_unet_ or lora_te.")
        k = kind_for(set(parts))
        if k is None or set(parts) - k.known():
            raise StudioError(f"Module {name} has tensors no adapter kind reads: {sorted(parts)}.",
                              "Use kohya / LyCORIS suffixes (lora_down.weight, hada_w1_a, lokr_w1, diff, ...).")
        shapes = {s: tuple(t.shape) for s, t in parts.items()}
        kinds.append(AdapterModule(name, k, shapes).kind)
        for suffix, t in parts.items():
            t = t.detach().cpu()
            if suffix == "alpha":
                t = t.reshape(()).float()
            elif t.is_floating_point() and dtype is not None:
                t = t.to(dtype)
            tensors[f"{name}.{suffix}"] = t.contiguous()
    kind = kind or file_kind(kinds)
    p = Path(path)
    meta = build_metadata(modules, family, kind, p.stem, metadata)
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = _hashes(tensors, meta)
    return save_safetensors(p, tensors, meta)


# ---- peft -> webUI ---------------------------------------------------------------------------

def _peft_module_tensors(layer) -> dict[str, torch.Tensor] | None:
    """The kohya / LyCORIS tensors for one peft tuner layer's active adapter (None if not a known kind)."""
    name = layer.active_adapters[0] if getattr(layer, "active_adapters", None) else "default"
    cls = type(layer).__mro__
    cls_names = {c.__name__ for c in cls}
    base_w = layer.get_base_layer().weight
    if "LoraLayer" in cls_names and name in layer.lora_A:
        down = layer.lora_A[name].weight.detach()
        up = layer.lora_B[name].weight.detach()
        r = down.shape[0]
        out = {"lora_down.weight": down, "lora_up.weight": up,
               "alpha": torch.tensor(float(layer.scaling[name]) * r)}
        if layer.use_dora.get(name, False):
            mag = layer.lora_magnitude_vector[name].weight.detach()
            out["dora_scale"] = dora.to_file_layout(mag, base_w.ndim)
        return out
    if "LoHaLayer" in cls_names and name in layer.hada_w1_a:
        out = {k: getattr(layer, k)[name].detach() for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
        for k in ("hada_t1", "hada_t2"):
            if name in getattr(layer, k):
                out[k] = getattr(layer, k)[name].detach()
        out["alpha"] = torch.tensor(float(layer.scaling[name]) * out["hada_w1_b"].shape[0])
        return out
    if "LoKrLayer" in cls_names and (name in layer.lokr_w1 or name in layer.lokr_w1_a):
        out = {}
        for k in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"):
            if name in getattr(layer, k):
                out[k] = getattr(layer, k)[name].detach()
        scaling = float(layer.scaling[name])
        r = int(out["lokr_w1_b"].shape[0]) if "lokr_w1_b" in out else (
            int(out["lokr_w2_b"].shape[0]) if "lokr_w2_b" in out else None)
        if r is None:  # two full factors: readers use scale 1, so bake peft's scaling into w1
            out["lokr_w1"] = out["lokr_w1"] * scaling
        else:
            out["alpha"] = torch.tensor(scaling * r)
        return out
    return None


def peft_to_webui(models: dict[str, torch.nn.Module], family: str) -> dict[str, dict[str, torch.Tensor]]:
    """webUI name -> tensors for every peft-adapted layer of ``models`` (by component name)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from studio.adapters.keymap import build_keymap
    from studio.models.family import base_family

    family = base_family(family)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for comp, model in models.items():
        if comp not in ("unet", "text_encoder", "text_encoder_2"):
            raise StudioError(f"Unknown component {comp!r}.", "Use unet, text_encoder or text_encoder_2.")
        kmap = build_keymap({comp: model}, family)
        for path, layer in model.named_modules():
            if not isinstance(layer, BaseTunerLayer):
                continue
            tensors = _peft_module_tensors(layer)
            if tensors is None:
                raise StudioError(f"{comp}.{path} carries a {type(layer).__name__} adapter, which webUIs cannot read.",
                                  "Train a LoRA, DoRA, LoHa or LoKr adapter.")
            try:
                name = kmap.to_webui(comp, path)
            except KeyError as err:
                raise StudioError(f"{comp}.{path} has no webUI name; a webUI would not load it.",
                                  "Leave this module out of the adapter's target modules.") from err
            out[name] = tensors
    return out


def export_peft(out_path, models: dict[str, torch.nn.Module], family: str, metadata: dict | None = None,
                dtype: torch.dtype = torch.float16) -> Path:
    """Write the peft adapters carried by ``models`` ({"unet": ..., "text_encoder": ...}) for webUIs."""
    modules = peft_to_webui(models, family)
    return save_adapter(out_path, modules, family, None, metadata, dtype)
