"""Reading adapter files, header first.

``load_adapter(path)`` reads only the safetensors header (plus the few bytes of each 0-dim
``alpha``) to learn kind, family, format, names, shapes and metadata; a module's tensors are read
from the file on first access to ``module.tensors``.

Layouts read (all normalised to webUI / kohya names and kohya / LyCORIS suffixes):

- kohya / LyCORIS: ``lora_unet_*`` / ``lora_te_*`` / ``lora_te1_*`` / ``lora_te2_*`` + suffix;
- SimpleTuner / LyCORIS wrapper: ``lycoris_<diffusers path, underscored>`` (UNet);
- diffusers (``pytorch_lora_weights.safetensors``: ``unet.<path>.lora_A.weight``,
  ``text_encoder.<path>.lora_B.weight``, old ``.lora.down.weight`` / ``processor.to_q_lora``) and
  peft (``base_model.model.<path>.lora_A.weight``, ``lora_magnitude_vector``);
- pickles (``.pt`` / ``.bin`` / ``.ckpt``) only through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from studio.adapters import keymap as km
from studio.adapters.registry import AdapterModule, kind_for
from studio.errors import StudioError
from studio.fileio import SafetensorsHeader, read_safetensors_header

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
               "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}
CROSS_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
TE_WIDTH = {768: "sd1", 1024: "sd2"}
EMBEDDING_KEYS = ({"emb_params"}, {"clip_l", "clip_g"})

# diffusers / peft suffixes -> kohya suffixes
_DIFFUSERS_SUFFIX = [
    (re.compile(r"\.lora_A(?:\.[\w-]+)?\.weight$"), "lora_down.weight"),
    (re.compile(r"\.lora_B(?:\.[\w-]+)?\.weight$"), "lora_up.weight"),
    (re.compile(r"\.lora_magnitude_vector(?:\.[\w-]+)?(?:\.weight)?$"), "dora_scale"),
    (re.compile(r"\.lora(?:_linear_layer)?\.down\.weight$"), "lora_down.weight"),
    (re.compile(r"\.lora(?:_linear_layer)?\.up\.weight$"), "lora_up.weight"),
    (re.compile(r"\.alpha$"), "alpha"),
]
_OLD_ATTN = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}
_OLD_TE_ATTN = {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj", "to_out_lora": "out_proj"}


def tensor_from_bytes(raw: bytes, dtype: str, shape) -> torch.Tensor:
    t = ST_DTYPES.get(dtype)
    if t is None:
        raise StudioError(f"Unsupported tensor dtype {dtype}.", "Convert the file to fp16 or fp32.")
    if not raw:
        return torch.empty(tuple(shape), dtype=t)
    return torch.frombuffer(bytearray(raw), dtype=t).reshape(tuple(shape)).clone()


def read_tensors(header: SafetensorsHeader, keys) -> dict[str, torch.Tensor]:
    """Read just ``keys`` from the file (seek + read of their byte ranges)."""
    out = {}
    with open(header.path, "rb", buffering=0) as fh:  # unbuffered: read exactly these bytes
        for key in keys:
            info = header.tensors[key]
            start, end = info["data_offsets"]
            fh.seek(header.data_start + start)
            out[key] = tensor_from_bytes(fh.read(end - start), info["dtype"], info["shape"])
    return out


@dataclass
class AdapterFile:
    """One adapter file as read: see ``load_adapter``."""

    path: Path
    format: str
    family: str | None
    metadata: dict[str, str]
    modules: dict[str, AdapterModule] = field(default_factory=dict)
    unknown_keys: list[str] = field(default_factory=list)
    renamed: list[tuple[str, str]] = field(default_factory=list)  # (name in the file, webUI name read as)
    family_source: str = ""  # "metadata" | "evidence" | ""
    dtype: str | None = None
    size: int = 0
    n_tensors: int = 0
    embedding: object = None  # an Embedding for textual-inversion files
    header: SafetensorsHeader | None = None

    @property
    def kind(self) -> str:
        if self.embedding is not None:
            return "embedding"
        return file_kind(m.kind for m in self.modules.values())

    def parts(self) -> dict[str, int]:
        c = Counter(km.part_of(n) for n in self.modules)
        return {p: c.get(p, 0) for p in ("unet", "te1", "te2")}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor in kohya layout (``name.suffix``), loading them."""
        return {f"{n}.{s}": t for n, m in self.modules.items() for s, t in m.tensors.items()}


def file_kind(kinds) -> str:
    kinds = set(kinds)
    if kinds <= {"lora", "locon"} and kinds:
        return "locon" if "locon" in kinds else "lora"
    if len(kinds) == 1:
        return kinds.pop()
    return "mixed" if kinds else "unknown"


def family_from_metadata(meta: dict[str, str]) -> str | None:
    base = meta.get("ss_base_model_version", "")
    arch = meta.get("modelspec.architecture", "")
    if base.startswith("sdxl") or arch.startswith("stable-diffusion-xl"):
        return "sdxl"
    if meta.get("ss_v2") == "True" or base.startswith("sd_v2") or arch.startswith("stable-diffusion-v2"):
        return "sd2"
    if base.startswith("sd_v1") or arch.startswith("stable-diffusion-v1") or meta.get("ss_v2") == "False":
        return "sd1"
    return None


def _in_width(shapes: dict[str, tuple]) -> int | None:
    for k in ("lora_down.weight", "hada_w1_b", "lokr_w1_b"):
        if k in shapes and len(shapes[k]) >= 2 and k != "lokr_w1_b":
            return int(shapes[k][1])
    if "diff" in shapes:
        return int(shapes["diff"][1])
    return None


def family_from_evidence(raw: dict[str, dict[str, tuple]]) -> str | None:
    """Family from names and shapes: a te2 part or SGM block names mean SDXL; else widths."""
    names = list(raw)
    if any(n.startswith("lora_te2_") for n in names):
        return "sdxl"
    if any(re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_", n) for n in names):
        return "sdxl"
    for n, shapes in raw.items():
        if n.startswith("lora_unet_") and re.search(r"attn2_to_[kv]$", n):
            w = _in_width(shapes)
            if w in CROSS_WIDTH:
                return CROSS_WIDTH[w]
    for n, shapes in raw.items():
        if n.startswith("lora_te") and re.search(r"self_attn_q_proj$", n):
            w = _in_width(shapes)
            if w in TE_WIDTH:
                return TE_WIDTH[w]
    return None


def _split_kohya(key: str) -> tuple[str, str] | None:
    name, dot, suffix = key.partition(".")
    return (name, suffix) if dot else None


def _diffusers_component(path: str) -> tuple[str, str]:
    for comp in ("unet", "text_encoder_2", "text_encoder"):
        if path.startswith(comp + "."):
            return comp, path[len(comp) + 1:]
    path = km.strip_peft(path)
    if re.match(r"(down_blocks|mid_block|up_blocks|conv_in|conv_out|time_embedding|add_embedding)\b", path):
        return "unet", path
    return "text_encoder", path


def _parse_diffusers_key(key: str) -> tuple[str, str, str] | None:
    """``unet.down_blocks...to_q.lora_A.weight`` -> (component, module path, kohya suffix)."""
    for pattern, suffix in _DIFFUSERS_SUFFIX:
        m = pattern.search(key)
        if m:
            comp, path = _diffusers_component(key[:m.start()])
            # old diffusers attention-processor names
            m2 = re.search(r"(?:\.processor)?\.(to_q_lora|to_k_lora|to_v_lora|to_out_lora)$", path)
            if m2:
                table = _OLD_TE_ATTN if comp.startswith("text_encoder") else _OLD_ATTN
                path = path[:m2.start()] + "." + table[m2[1]]
            return comp, path, suffix
    return None


def _unet_config_from_paths(paths) -> dict:
    """Enough of a UNet config for SGM naming, from which up blocks hold attentions."""
    ups = {int(m[1]) for p in paths if (m := re.match(r"up_blocks\.(\d+)\.", p))}
    with_attn = {int(m[1]) for p in paths if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", p))}
    n = max(ups | {2}) + 1
    if not with_attn:
        return km.sdxl_default_config()
    return {"layers_per_block": 2,
            "up_block_types": ["CrossAttnUpBlock2D" if i in with_attn else "UpBlock2D" for i in range(n)]}


def _adapter_alphas(meta: dict[str, str]) -> dict[str, tuple[float, dict]]:
    """diffusers' ``lora_adapter_metadata``: component -> (lora_alpha, alpha_pattern)."""
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    out = {}
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        if f"{comp}.lora_alpha" in data:
            out[comp] = (float(data[f"{comp}.lora_alpha"]), data.get(f"{comp}.alpha_pattern") or {})
    return out


def parse_layout(shapes: dict[str, tuple], metadata: dict[str, str]):
    """Group tensor keys into modules.

    Returns ``(format, family, family_source, groups, unknown, synth)``: ``groups`` maps webUI
    name -> {kohya suffix: file key}; ``synth`` maps webUI name -> {suffix: tensor} for values
    a diffusers file keeps in metadata (alpha); ``unknown`` lists keys no reader maps.
    """
    kohya: dict[str, dict[str, str]] = {}
    renamed: list[tuple[str, str]] = []
    lyco: dict[str, dict[str, str]] = {}
    diff: dict[tuple[str, str], dict[str, str]] = {}
    unknown = []
    for key in shapes:
        if key.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) and _split_kohya(key):
            name, suffix = _split_kohya(key)
            kohya.setdefault(name, {})[suffix] = key
        elif key.startswith("lycoris_") and _split_kohya(key):
            name, suffix = _split_kohya(key)
            lyco.setdefault(name[len("lycoris_"):], {})[suffix] = key
        elif (parsed := _parse_diffusers_key(key)) is not None:
            comp, path, suffix = parsed
            diff.setdefault((comp, path), {})[suffix] = key
        else:
            unknown.append(key)
    fmt = "kohya" if kohya else "lycoris" if lyco else ("peft" if any(
        k.startswith("base_model.model.") or (".lora_A." in k and not k.startswith(("unet.", "text_encoder")))
        for k in shapes) else "diffusers") if diff else "unknown"

    family = family_from_metadata(metadata)
    source = "metadata" if family else ""
    # Evidence needs webUI-style names; build provisional ones (SD1-style for the UNet).
    provisional: dict[str, dict[str, tuple]] = {}
    for name, g in kohya.items():
        provisional[name] = {s: shapes[k] for s, k in g.items()}
    for name, g in lyco.items():
        provisional["lora_unet_" + name] = {s: shapes[k] for s, k in g.items()}
    for (comp, path), g in diff.items():
        pname = km.to_webui_name(comp, path, "sd1")
        if comp == "text_encoder_2":
            pname = "lora_te2_" + pname[len("lora_te_"):]
        provisional[pname] = {s: shapes[k] for s, k in g.items()}
    if family is None:
        family = family_from_evidence(provisional)
        source = "evidence" if family else ""

    groups: dict[str, dict[str, str]] = {}
    # diffusers' convert_state_dict_to_kohya keeps diffusers block names for an SDXL UNet
    # (lora_unet_down_blocks_...), which A1111 cannot map: read them as their SGM names.
    diffusers_named = [n for n in kohya if family == "sdxl" and n.startswith(_DIFFUSERS_UNET_PREFIXES)]
    sdxl_cfg = _unet_config_from_paths(km.underscored_unet_to_dotted(n[len("lora_unet_"):]) for n in diffusers_named)
    for name, g in kohya.items():
        fixed = normalise_kohya_name(name, family)
        if name in diffusers_named:
            try:
                fixed = "lora_unet_" + _sgm_underscored(name[len("lora_unet_"):], sdxl_cfg)
            except KeyError:
                unknown.extend(g.values())
                continue
        if fixed != name:
            renamed.append((name, fixed))
        groups[fixed] = g
    synth: dict[str, dict[str, torch.Tensor]] = {}
    if lyco:
        cfg = _unet_config_from_paths(km.underscored_unet_to_dotted(n) for n in lyco)
        for name, g in lyco.items():
            try:
                webui = ("lora_unet_" + _sgm_underscored(name, cfg)) if family == "sdxl" else "lora_unet_" + name
            except KeyError:
                unknown.extend(g.values())
                continue
            groups[webui] = g
    if diff:
        cfg = _unet_config_from_paths(p for c, p in diff if c == "unet")
        alphas = _adapter_alphas(metadata)
        for (comp, path), g in diff.items():
            try:
                webui = km.to_webui_name(comp, path, family, cfg)
            except KeyError:
                unknown.extend(g.values())
                continue
            groups[webui] = g
            if "alpha" not in g and comp in alphas:
                alpha, pattern = alphas[comp]
                for pat, val in pattern.items():
                    if path == pat or path.endswith("." + pat):
                        alpha = float(val)
                synth[webui] = {"alpha": torch.tensor(alpha)}
    return fmt, family, source, groups, unknown, synth, renamed


_DIFFUSERS_UNET_PREFIXES = ("lora_unet_down_blocks_", "lora_unet_up_blocks_", "lora_unet_mid_block_")


def normalise_kohya_name(name: str, family: str | None) -> str:
    """Fix names other tools write that webUIs do not map.

    diffusers' ``convert_state_dict_to_kohya`` on a transformers>=5.6 ``CLIPTextModel`` writes
    ``lora_te1_encoder_layers_...`` (no ``text_model_``), and ``lora_te1_`` even for SD1/SD2.
    """
    m = re.match(r"(lora_te[12]?_)(.*)$", name)
    if not m:
        return name
    prefix, rest = m[1], m[2]
    if rest.startswith("encoder_") or rest.startswith("final_layer_norm") or rest.startswith("embeddings_"):
        rest = "text_model_" + rest
    if prefix == "lora_te1_" and family != "sdxl":  # SDXL would have shown a te2 part or SGM names
        prefix = "lora_te_"
    return prefix + rest


def _sgm_underscored(name: str, cfg: dict) -> str:
    """``down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q`` -> SGM name, underscored."""
    dotted = km.underscored_unet_to_dotted(name)
    m = re.match(r"(.*attentions\.\d+)\.(.+)$", dotted)
    if m:
        return (km.unet_module_to_sgm(m[1], cfg) + "." + m[2]).replace(".", "_")
    return km.unet_module_to_sgm(dotted, cfg).replace(".", "_")


def _make_modules(groups, shapes, dtypes, fetch: Callable, synth, unknown) -> dict[str, AdapterModule]:
    """Build AdapterModules; ``fetch(keys) -> {key: tensor}`` reads tensors when asked."""
    modules = {}
    for name, g in sorted(groups.items()):
        kind = kind_for(set(g))
        if kind is None:
            unknown.extend(g.values())
            continue
        extra = [k for s, k in g.items() if s not in kind.known()]
        unknown.extend(extra)
        g = {s: k for s, k in g.items() if s in kind.known()}
        mod_shapes = {s: tuple(shapes[k]) for s, k in g.items()}
        fixed = synth.get(name, {})
        for s, t in fixed.items():
            mod_shapes[s] = tuple(t.shape)
        ndim = len(mod_shapes.get("lora_down.weight") or mod_shapes.get("diff") or (0, 0))
        if "dora_scale" in mod_shapes and len(mod_shapes["dora_scale"]) == 1:  # peft magnitude [out]
            mod_shapes["dora_scale"] = (mod_shapes["dora_scale"][0],) + (1,) * (ndim - 1)
        elif "dora_scale" in mod_shapes and len(mod_shapes["dora_scale"]) == 4 and ndim == 4 \
                and mod_shapes["dora_scale"][0] == 1 and "lora_magnitude_vector" in g["dora_scale"]:
            mod_shapes["dora_scale"] = (mod_shapes["dora_scale"][1], 1, 1, 1)  # peft conv magnitude [1,out,1,1]

        def loader(g=g, fixed=fixed, dshape=mod_shapes.get("dora_scale")):
            raw = fetch(list(g.values()))
            t = {s: raw[k] for s, k in g.items()}
            if "dora_scale" in t:
                t["dora_scale"] = t["dora_scale"].reshape(dshape)
            t.update(fixed)
            return t

        def alpha_loader(g=g, fixed=fixed):
            if "alpha" in fixed:
                return float(fixed["alpha"].item())
            if "alpha" in g:
                return float(fetch([g["alpha"]])[g["alpha"]].float().item())
            return None

        modules[name] = AdapterModule(name=name, kind_impl=kind, shapes=mod_shapes,
                                      dtypes={s: dtypes.get(k, "") for s, k in g.items()},
                                      _loader=loader, _alpha_loader=alpha_loader)
    return modules


def _prefetch_alphas(header: SafetensorsHeader, modules: dict, groups: dict) -> None:
    """Read every module's 0-dim alpha in one pass (a few bytes each), so inspect needs no more."""
    keys = {name: groups[name]["alpha"] for name in modules if "alpha" in groups.get(name, {})}
    values = read_tensors(header, sorted(keys.values(), key=lambda k: header.tensors[k]["data_offsets"][0]))
    for name, key in keys.items():
        modules[name]._alpha = float(values[key].float().item())
        modules[name]._alpha_loaded = True


def _main_dtype(dtypes: list[str]) -> str | None:
    c = Counter(d for d in dtypes if d)
    if not c:
        return None
    d = c.most_common(1)[0][0]
    return DTYPE_NAMES.get(d, d.lower())


def load_adapter(path) -> "AdapterFile":
    """Read an adapter or embedding file header-first (see the module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise StudioError(f"{p} does not exist or is not a file.", "Check the path.")
    if p.suffix.lower() in PICKLE_SUFFIXES:
        return _load_pickle(p)
    header = read_safetensors_header(p)
    shapes = {k: tuple(v["shape"]) for k, v in header.tensors.items()}
    dtypes = {k: v["dtype"] for k, v in header.tensors.items()}
    base = dict(path=p, metadata=header.metadata, dtype=_main_dtype(list(dtypes.values())), size=header.file_size,
                n_tensors=len(shapes), header=header)
    if set(shapes) in EMBEDDING_KEYS:
        from studio.adapters.embedding import embedding_from_header

        emb = embedding_from_header(header)
        return AdapterFile(format=emb.format, family=emb.family, embedding=emb,
                           family_source="metadata" if family_from_metadata(header.metadata) else "evidence", **base)
    fmt, family, source, groups, unknown, synth, renamed = parse_layout(shapes, header.metadata)
    modules = _make_modules(groups, shapes, dtypes, lambda keys: read_tensors(header, keys), synth, unknown)
    _prefetch_alphas(header, modules, groups)
    if not modules and not unknown and not shapes:
        raise StudioError(f"{p.name} holds no tensors.", "The file is empty; export it again.")
    return AdapterFile(format=fmt, family=family, family_source=source, modules=modules, unknown_keys=unknown,
                       renamed=renamed, **base)


def _load_pickle(p: Path) -> AdapterFile:
    from studio.fileio import torch_load_safe

    obj = torch_load_safe(p)
    if isinstance(obj, dict) and "string_to_param" in obj:
        from studio.adapters.embedding import embedding_from_a1111

        emb = embedding_from_a1111(p, obj)
        return AdapterFile(path=p, format="a1111-pt", family=emb.family, metadata={}, embedding=emb,
                           family_source="evidence" if emb.family else "", size=p.stat().st_size,
                           n_tensors=len(emb.vectors), dtype=_main_dtype([TORCH_TO_ST.get(v.dtype, "") for v in emb.vectors.values()]))
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise StudioError(f"{p.name} is not an adapter: it does not hold a flat dict of tensors.",
                          "Pick a LoRA / LyCORIS / embedding file.")
    if len(obj) == 1 and next(iter(obj.values())).ndim in (1, 2):  # diffusers learned_embeds.bin {token: tensor}
        from studio.adapters.embedding import embedding_from_single

        emb = embedding_from_single(p, obj)
        return AdapterFile(path=p, format="diffusers-bin", family=emb.family, metadata={}, embedding=emb,
                           size=p.stat().st_size, n_tensors=1, family_source="evidence" if emb.family else "",
                           dtype=_main_dtype([TORCH_TO_ST.get(v.dtype, "") for v in obj.values()]))
    shapes = {k: tuple(v.shape) for k, v in obj.items()}
    dtypes = {k: TORCH_TO_ST.get(v.dtype, "") for k, v in obj.items()}
    fmt, family, source, groups, unknown, synth, renamed = parse_layout(shapes, {})
    modules = _make_modules(groups, shapes, dtypes, lambda keys: {k: obj[k] for k in keys}, synth, unknown)
    return AdapterFile(path=p, format=fmt + "-pickle", family=family, family_source=source, metadata={},
                       modules=modules, unknown_keys=unknown, renamed=renamed, size=p.stat().st_size, n_tensors=len(obj),
                       dtype=_main_dtype(list(dtypes.values())))
