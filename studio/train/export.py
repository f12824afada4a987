"""The training engine's links to the rest of the studio: writing the adapter (studio.adapters),
preview samples (studio.generate, the Generate tab's own code), dataset metadata
(studio.dataset.captions) and the base model's hashes."""

from __future__ import annotations

from pathlib import Path


def export(out: Path, models: dict, family: str, metadata: dict, dtype) -> Path:
    from studio.adapters import export_peft

    return Path(export_peft(out, models, family, metadata=metadata, dtype=dtype))


def txt2img(pipe, prompt, **kw):
    from studio.generate.engine import txt2img as _txt2img

    return _txt2img(pipe, prompt, batch=1, **kw)[0]


def tag_frequency(dataset) -> dict:
    from studio.dataset.captions import tag_frequency as _tf

    return _tf(dataset)


def dataset_dirs(dataset) -> dict:
    from studio.dataset.captions import dataset_dirs as _dd

    return _dd(dataset)


def model_hashes(source) -> tuple[str, str]:
    """(kohya ``ss_sd_model_hash`` (legacy 8-hex), ``ss_new_sd_model_hash`` (sha256)) of the base model.

    For a single file: the file. For a diffusers folder (and the tiny model): its UNet weights
    file. For a hub id: "" (not known without reading the whole download).
    """
    import hashlib

    path = getattr(source, "path", None)
    if path is None:
        return "", ""
    path = Path(path)
    if path.is_dir():
        found = sorted((path / "unet").glob("*.safetensors")) if (path / "unet").is_dir() else []
        if not found:
            return "", ""
        path = found[0]
    if not path.is_file():
        return "", ""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(0x100000)
        legacy = hashlib.sha256(fh.read(0x10000)).hexdigest()[:8]
        fh.seek(0)
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return legacy, h.hexdigest()
