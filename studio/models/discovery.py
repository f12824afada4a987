"""Find base models the user already has: webUI checkpoint folders, the HF cache, the workspace."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from studio.tiny import TINY_LABEL

MODEL_SUFFIXES = (".safetensors", ".ckpt")
# Where A1111 / Forge and ComfyUI keep checkpoints, relative to their install folder.
WEBUI_CHECKPOINT_SUBDIRS = ("models/Stable-diffusion", "models/checkpoints")


@dataclass
class ModelEntry:
    label: str
    spec: str
    kind: str  # tiny | single_file | folder | hub
    family: str = ""


def checkpoint_dirs(dirs) -> list[Path]:
    """A user may point at a webUI install or straight at its checkpoint folder; accept both."""
    out = []
    for d in dirs:
        d = Path(d).expanduser()
        found = [d / s for s in WEBUI_CHECKPOINT_SUBDIRS if (d / s).is_dir()]
        out.extend(found or ([d] if d.is_dir() else []))
    return out


def discover_models(extra_dirs=(), settings=None, include_tiny: bool = True) -> list[ModelEntry]:
    from studio.models.family import family_from_keys
    from studio.places import Settings, Workspace

    settings = settings or Settings.load()
    entries: list[ModelEntry] = []
    if include_tiny:
        entries += [ModelEntry(f"{TINY_LABEL} - SD1.x", "tiny:sd1", "tiny", "sd1"),
                    ModelEntry(f"{TINY_LABEL} - SDXL", "tiny:sdxl", "tiny", "sdxl")]
    ws_models = Workspace(settings.workspace_path()).models
    seen: set[str] = set()
    for root in checkpoint_dirs([*extra_dirs, *settings.models_dirs]) + ([ws_models] if ws_models.is_dir() else []):
        for p in sorted(root.rglob("*")):
            if len(p.relative_to(root).parts) > 3 or p.name.startswith("."):
                continue
            if p.is_file() and p.suffix.lower() in MODEL_SUFFIXES and str(p) not in seen:
                family = ""
                if p.suffix.lower() == ".safetensors":
                    try:
                        from studio.fileio import read_safetensors_header

                        h = read_safetensors_header(p)
                        family = family_from_keys(h.tensors.keys(), None, h.metadata) or ""
                    except Exception:
                        continue  # not a checkpoint (or broken): the loader explains when picked
                    if not family:
                        continue  # a LoRA or embedding sitting in the folder
                seen.add(str(p))
                entries.append(ModelEntry(p.name, str(p), "single_file", family))
            elif p.is_dir() and (p / "model_index.json").exists() and not p.name.startswith("tiny-"):
                from studio.models.family import family_of_diffusers_folder

                try:
                    entries.append(ModelEntry(p.name, str(p), "folder", family_of_diffusers_folder(p)))
                except Exception:
                    continue
    entries += _hf_cache_pipelines()
    return entries


def _hf_cache_pipelines() -> list[ModelEntry]:
    """Diffusers pipelines already downloaded into the Hugging Face cache (no network)."""
    try:
        from huggingface_hub import scan_cache_dir

        info = scan_cache_dir()
    except Exception:
        return []
    out = []
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        for rev in repo.revisions:
            if any(f.file_name == "model_index.json" and f.file_path.parent == rev.snapshot_path for f in rev.files):
                from studio.models.family import family_of_diffusers_folder

                try:
                    fam = family_of_diffusers_folder(rev.snapshot_path)
                except Exception:
                    fam = ""
                out.append(ModelEntry(f"{repo.repo_id} (HF cache)", repo.repo_id, "hub", fam))
                break
    return out
