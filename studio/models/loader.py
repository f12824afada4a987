"""The one path by which every tab and CLI command gets a base model.

A model "spec" is a string, as the user would type or pick it:
- a diffusers folder (has ``model_index.json``);
- a single-file checkpoint in the webUI layout (``.safetensors``; ``.ckpt`` / ``.pt`` pickles are
  opened only with ``weights_only=True`` and converted once to safetensors in the cache);
- a Hugging Face hub id (``stable-diffusion-v1-5/stable-diffusion-v1-5``), downloaded on first use
  into the normal Hugging Face cache;
- ``tiny:sd1`` / ``tiny:sdxl``, the built-in demo model (random weights), built on first use.

Single files are loaded offline through diffusers' ``from_single_file(config=...)`` with config
folders shipped in ``studio/models/configs`` (numbers only, no weights). What cannot be had
offline (a CLIP tokenizer that is in no cache) is named in a StudioError, not a stack trace.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.errors import StudioError
from studio.fileio import read_safetensors_header, save_safetensors, torch_load_safe
from studio.models.family import FAMILIES, base_family, family_from_keys, family_of_diffusers_folder

CONFIG_ROOT = Path(__file__).parent / "configs"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

# Where the tokenizers for bare single files are looked for: (repo, subfolder), most specific first.
TOKENIZER_SOURCES = {
    ("sd1", "tokenizer"): [("openai/clip-vit-large-patch14", ""),
                           ("stable-diffusion-v1-5/stable-diffusion-v1-5", "tokenizer"),
                           ("runwayml/stable-diffusion-v1-5", "tokenizer")],
    ("sd2", "tokenizer"): [("stabilityai/stable-diffusion-2-1", "tokenizer"),
                           ("stabilityai/stable-diffusion-2-1-base", "tokenizer"),
                           ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "")],
    ("sdxl", "tokenizer"): [("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer"),
                            ("openai/clip-vit-large-patch14", "")],
    ("sdxl", "tokenizer_2"): [("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer_2"),
                              ("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", "")],
}
TOKENIZER_FILES = ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"]


@dataclass
class ModelSource:
    spec: str
    kind: str  # folder | single_file | hub | tiny
    family: str
    path: Path | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        if self.kind == "hub" or self.kind == "tiny":
            return self.spec
        return self.path.stem if self.path.is_file() else self.path.name


@dataclass
class LoadedModel:
    source: ModelSource
    pipe: Any
    device: str
    dtype: Any

    @property
    def family(self) -> str:
        return self.source.family


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def pick_device(preference: str = "auto") -> str:
    import torch

    if preference not in ("auto", ""):
        return preference
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(device: str, preference: str = "auto"):
    """fp16 on a GPU (bf16 where asked and supported), fp32 on the CPU."""
    import torch

    if preference == "fp32" or device == "cpu":
        return torch.float32
    if preference == "bf16":
        return torch.bfloat16
    return torch.float16


def _tiny_path(family: str) -> Path:
    from studio.places import Settings, Workspace

    return Workspace(Settings.load().workspace_path()).models / f"tiny-{family}"


def resolve(spec: str) -> ModelSource:
    """Work out what ``spec`` is and which family it belongs to, without loading weights."""
    spec = str(spec).strip()
    if not spec:
        raise StudioError("No base model chosen.", "Pick a model in the base-model list, or use the tiny demo model.")
    if spec.startswith("tiny:"):
        family = spec.split(":", 1)[1]
        if family not in ("sd1", "sdxl"):
            raise StudioError(f"Unknown tiny model {spec!r}.", "Use tiny:sd1 or tiny:sdxl.")
        return ModelSource(spec, "tiny", family, _tiny_path(family))
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise StudioError(f"{path} is a folder but not a diffusers model (no model_index.json).",
                              "Pick the model's top folder, or a single .safetensors checkpoint.")
        try:
            return ModelSource(spec, "folder", family_of_diffusers_folder(path), path)
        except (OSError, ValueError, KeyError) as err:
            raise StudioError(f"{path} has unreadable configs: {err}", "Re-download or re-save the model.") from err
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".safetensors":
            header = read_safetensors_header(path)
            return ModelSource(spec, "single_file", _single_file_family(path, header), path, header.metadata)
        if suffix in PICKLE_SUFFIXES:
            return ModelSource(spec, "single_file", "", path)  # family known once the pickle is safely read
        raise StudioError(f"{path.name} is not a model file the studio can read ({suffix or 'no extension'}).",
                          "Use a .safetensors checkpoint, a diffusers folder or a hub id.")
    if HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return ModelSource(spec, "hub", "")
    raise StudioError(f"Model not found: {spec}", "Check the path, or use a hub id such as "
                      "stable-diffusion-v1-5/stable-diffusion-v1-5.")


def _single_file_family(path: Path, header) -> str:
    yaml_file = path.with_suffix(".yaml")
    yaml_text = yaml_file.read_text(errors="replace") if yaml_file.exists() else None
    shapes = {k: tuple(v["shape"]) for k, v in header.tensors.items()}
    family = family_from_keys(header.tensors.keys(), shapes, header.metadata, yaml_text)
    if family is None:
        raise StudioError(f"{path.name} is not a Stable Diffusion checkpoint (no UNet weights found).",
                          "If it is a LoRA or an embedding, open it in the Inspect tab instead.")
    return family


def detect_family(spec: str) -> str:
    src = resolve(spec)
    if src.kind == "single_file" and not src.family:
        src = _pickle_to_safetensors(src)
    if src.kind == "hub" and not src.family:
        src.family = family_of_diffusers_folder(_hub_configs(src.spec))
    return src.family


def _pickle_to_safetensors(src: ModelSource) -> ModelSource:
    """Read a .ckpt safely (weights only) and convert it once to safetensors in the cache."""
    from studio.places import cache_dir

    st = src.path.stat()
    key = hashlib.sha256(f"{src.path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "converted" / f"{src.path.stem}-{key}.safetensors"
    if not out.exists():
        obj = torch_load_safe(src.path)
        state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
        if not isinstance(state, dict):
            raise StudioError(f"{src.path.name} holds no state dict.", "It is not a Stable Diffusion checkpoint.")
        import torch

        tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        save_safetensors(out, tensors)
    header = read_safetensors_header(out)
    return ModelSource(src.spec, "single_file", _single_file_family(src.path, header), out, header.metadata)


def _config_dir_for(src: ModelSource) -> Path:
    """A local diffusers-layout folder of configs (and tokenizers) for ``from_single_file``."""
    from studio.places import cache_dir
    from studio.tiny import EMBEDDED_CONFIG_KEY

    embedded = src.metadata.get(EMBEDDED_CONFIG_KEY)
    if embedded:
        files = json.loads(embedded)
        out = cache_dir() / "configs" / ("embedded-" + hashlib.sha256(embedded.encode()).hexdigest()[:16])
        if not (out / "model_index.json").exists():
            tmp = out.with_name(out.name + f".tmp{os.getpid()}")
            for rel, text in files.items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_text(text, encoding="utf-8")
            try:
                tmp.rename(out)
            except OSError:  # another process won the race; theirs is identical
                shutil.rmtree(tmp, ignore_errors=True)
        return out
    out = cache_dir() / "configs" / src.family
    if not (out / "model_index.json").exists():
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(CONFIG_ROOT / src.family, tmp)
        try:
            tmp.rename(out)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    base = base_family(src.family)
    for sub in ("tokenizer", "tokenizer_2") if base == "sdxl" else ("tokenizer",):
        if not (out / sub / "vocab.json").exists() and not (out / sub / "tokenizer.json").exists():
            _fetch_tokenizer(base, sub, out / sub)
    return out


def _fetch_tokenizer(base: str, sub: str, dest: Path) -> None:
    from huggingface_hub import hf_hub_download

    tried = []
    for local_only in (True, False):
        if not local_only and offline():
            break
        for repo, folder in TOKENIZER_SOURCES[(base, sub)]:
            try:
                got = {}
                for name in TOKENIZER_FILES[:2]:
                    got[name] = hf_hub_download(repo, name, subfolder=folder or None, local_files_only=local_only)
                for name in TOKENIZER_FILES[2:]:
                    try:
                        got[name] = hf_hub_download(repo, name, subfolder=folder or None, local_files_only=local_only)
                    except Exception:  # optional files
                        pass
            except Exception:
                tried.append(f"{repo}/{folder}".rstrip("/"))
                continue
            dest.mkdir(parents=True, exist_ok=True)
            for name, p in got.items():
                shutil.copyfile(p, dest / name)
            return
    raise StudioError(
        f"This single-file checkpoint needs a CLIP tokenizer ({sub}) that is not on this machine and could not be "
        f"downloaded (looked for: {', '.join(dict.fromkeys(tried))}).",
        "Connect to the internet once so the studio can fetch it (a few MB), or use the model as a diffusers "
        "folder, or copy a tokenizer folder (vocab.json + merges.txt) from another SD model into "
        f"{dest}.")


def _hub_configs(repo: str) -> Path:
    """Download (or find in the cache) only the configs of a hub pipeline."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, allow_patterns=["*.json", "*.txt"], local_files_only=offline()))
    except Exception as err:
        raise _hub_error(repo, err) from err


def _hub_error(repo: str, err: Exception) -> StudioError:
    text = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
    if offline() or "offline" in text.lower() or "connect" in text.lower() or "local" in text.lower():
        return StudioError(f"Could not get {repo} from the Hugging Face hub: it is not in the local cache and "
                           f"the hub cannot be reached ({text}).",
                           "Connect to the internet for the first download, or pick a local file or folder.")
    return StudioError(f"Could not get {repo} from the Hugging Face hub: {text}",
                       "Check the id (owner/name), and for gated models set a Hugging Face token in Settings.")


def _pipeline_class(family: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if base_family(family) == "sdxl" else StableDiffusionPipeline


def load_pipeline(spec: str, device: str | None = None, dtype=None) -> LoadedModel:
    """Load a base model as a diffusers pipeline on ``device`` in ``dtype`` (defaults: best available)."""
    import torch  # noqa: F401  (heavy imports happen here, never at studio import)

    src = resolve(spec)
    device = device or pick_device()
    dtype = dtype or pick_dtype(device)
    extra = {}
    if src.kind == "tiny":
        if not (src.path / "model_index.json").exists():
            from studio.tiny import save_tiny_model

            save_tiny_model(src.path, src.family)
        src = ModelSource(src.spec, "tiny", src.family, src.path)
    if src.kind == "single_file" and not src.family:
        src = _pickle_to_safetensors(src)
    if src.kind == "hub":
        src.family = family_of_diffusers_folder(_hub_configs(src.spec))
    if src.family not in FAMILIES:
        raise StudioError(f"Unsupported model family {src.family!r}.", "Use an SD 1.x, SD 2.x or SDXL model.")
    cls = _pipeline_class(src.family)
    if cls.__name__ == "StableDiffusionPipeline":
        extra = {"safety_checker": None, "requires_safety_checker": False, "feature_extractor": None}
    try:
        if src.kind in ("folder", "tiny"):
            pipe = cls.from_pretrained(src.path, dtype=dtype, local_files_only=True, **extra)
        elif src.kind == "single_file":
            cfg = _config_dir_for(src)
            pipe = cls.from_single_file(str(src.path), config=str(cfg), local_files_only=True, dtype=dtype)
        else:
            try:
                pipe = cls.from_pretrained(src.spec, dtype=dtype, local_files_only=offline(),
                                           use_safetensors=True, **extra)
            except OSError as err:
                raise _hub_error(src.spec, err) from err
    except StudioError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise StudioError(f"Could not load {src.name} as a {src.family} model: {str(err).splitlines()[0][:300]}",
                          "Check that the file is a complete Stable Diffusion checkpoint of that family.") from err
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    if device == "cpu":
        _own_memory(pipe)
    return LoadedModel(src, pipe, device, dtype)


def _own_memory(pipe) -> None:
    """Copy CPU weights out of the memory-mapped file into aligned memory of our own.

    Tensors mapped from a safetensors file sit at arbitrary byte offsets; the CPU kernels pick a
    different (slower, and differently rounded) path for unaligned data, so the same weights would
    give outputs that differ in the last bits between a folder and a single file. Owning the memory
    also releases the file, so it can be replaced or deleted while the model is loaded.
    """
    import torch

    with torch.no_grad():
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                for t in list(component.parameters()) + list(component.buffers()):
                    t.data = t.data.clone()


class ModelManager:
    """Keeps one base model resident, shared by every tab; loading another frees the first."""

    def __init__(self):
        self._lock = threading.RLock()
        self.current: LoadedModel | None = None
        self._key: tuple | None = None

    def get(self, spec: str, device: str | None = None, dtype=None) -> LoadedModel:
        with self._lock:
            device = device or pick_device()
            dtype = dtype or pick_dtype(device)
            key = (str(spec), device, str(dtype))
            if self.current is not None and self._key == key:
                return self.current
            self.unload()
            self.current = load_pipeline(spec, device, dtype)
            self._key = key
            return self.current

    def unload(self) -> None:
        with self._lock:
            if self.current is None:
                return
            self.current = None
            self._key = None
            import gc

            import torch

            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


MODELS = ModelManager()
