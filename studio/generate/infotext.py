"""The A1111 ``parameters`` text that webUIs and Civitai read from a PNG, written and read back.

Format (the last line is ``Key: value`` pairs; a value with a comma, colon or newline is JSON-quoted)::

    a photo of sks dog <lora:mydog:0.8>
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 42, Size: 512x512,
    Model hash: 6ce0161689, Model: v1-5, Clip skip: 2, Lora hashes: "mydog: 0123456789ab", Version: ...

``Model hash`` is A1111's short hash (sha256 of the whole file, 10 hex); ``Lora hashes`` are the
12-hex "addnet" hash (sha256 of the bytes after the safetensors header), what Civitai links by.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from studio.errors import StudioError

_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_RE_SIZE = re.compile(r"^(\d+)x(\d+)$")
VERSION = "Adapter Studio"


@dataclass
class GenerationParams:
    prompt: str = ""
    negative: str = ""
    steps: int = 20
    sampler: str = "Euler a"  # studio name, schedule included ("DPM++ 2M Karras")
    cfg: float = 7.0
    seed: int = 0
    width: int = 512
    height: int = 512
    clip_skip: int = 1
    model: str = ""
    model_hash: str = ""
    lora_hashes: dict[str, str] = field(default_factory=dict)
    ti_hashes: dict[str, str] = field(default_factory=dict)
    extra: dict[str, str] = field(default_factory=dict)  # other keys, kept as written


def _quote(text: str) -> str:
    text = str(text)
    if "," not in text and "\n" not in text and ":" not in text and '"' not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _unquote(text: str) -> str:
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def _num(v: float) -> str:
    return f"{v:g}"


def _hash_list(d: dict[str, str]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in d.items())


def _parse_hash_list(text: str) -> dict[str, str]:
    out = {}
    for item in text.split(","):
        if ":" in item:
            k, v = item.rsplit(":", 1)
            out[k.strip()] = v.strip()
    return out


def format_infotext(p: GenerationParams) -> str:
    from studio.generate.samplers import split_schedule

    sampler, schedule = split_schedule(p.sampler)
    pairs: list[tuple[str, str]] = [("Steps", str(p.steps)), ("Sampler", sampler)]
    if schedule:
        pairs.append(("Schedule type", schedule))
    pairs += [("CFG scale", _num(p.cfg)), ("Seed", str(p.seed)), ("Size", f"{p.width}x{p.height}")]
    if p.model_hash:
        pairs.append(("Model hash", p.model_hash))
    if p.model:
        pairs.append(("Model", p.model))
    if p.clip_skip > 1:
        pairs.append(("Clip skip", str(p.clip_skip)))
    if p.lora_hashes:
        pairs.append(("Lora hashes", _hash_list(p.lora_hashes)))
    if p.ti_hashes:
        pairs.append(("TI hashes", _hash_list(p.ti_hashes)))
    pairs += list(p.extra.items())
    if not any(k == "Version" for k, _ in pairs):
        pairs.append(("Version", VERSION))
    lines = [p.prompt]
    if p.negative:
        lines.append(f"Negative prompt: {p.negative}")
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in pairs))
    return "\n".join(lines)


def parse_infotext(text: str) -> GenerationParams:
    """Read A1111 / Forge / Civitai parameters text back (A1111's own parsing rules)."""
    from studio.generate.samplers import normalize

    text = (text or "").strip()
    if not text:
        raise StudioError("There are no generation parameters to read.",
                          "Use a PNG saved by a webUI or the studio (its 'parameters' text).")
    *lines, last = text.split("\n")
    if len(_RE_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    values = {k.strip(): _unquote(v.strip()) for k, v in _RE_PARAM.findall(last)}
    p = GenerationParams(prompt="\n".join(prompt), negative="\n".join(negative))
    known = {"Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model", "Clip skip",
             "Lora hashes", "TI hashes", "Version"}
    try:
        if "Steps" in values:
            p.steps = int(values["Steps"])
        if "CFG scale" in values:
            p.cfg = float(values["CFG scale"])
        if "Seed" in values:
            p.seed = int(values["Seed"])
        if "Clip skip" in values:
            p.clip_skip = int(values["Clip skip"])
        m = _RE_SIZE.match(values.get("Size", ""))
        if m:
            p.width, p.height = int(m.group(1)), int(m.group(2))
    except ValueError as err:
        raise StudioError(f"Unreadable generation parameters: {err}.", "The text was edited or is damaged.") from None
    if "Sampler" in values:
        try:
            p.sampler = normalize(values["Sampler"], values.get("Schedule type"))
        except StudioError:
            p.sampler = values["Sampler"]  # kept as written; the form says it is unknown
    p.model, p.model_hash = values.get("Model", ""), values.get("Model hash", "")
    p.lora_hashes = _parse_hash_list(values.get("Lora hashes", ""))
    p.ti_hashes = _parse_hash_list(values.get("TI hashes", ""))
    p.extra = {k: v for k, v in values.items() if k not in known}
    if values.get("Version") not in (None, VERSION):
        p.extra["Version"] = values["Version"]
    return p


def save_png(image, path: str | Path, infotext: str) -> Path:
    """Write ``image`` as a PNG with the ``parameters`` text chunk, atomically."""
    from PIL.PngImagePlugin import PngInfo

    from studio.fileio import atomic_write

    info = PngInfo()
    info.add_text("parameters", infotext)
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def read_image_params(path: str | Path) -> GenerationParams:
    """The parameters stored in a PNG (``parameters`` chunk) or a JPEG/WebP EXIF UserComment."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            text = im.info.get("parameters")
            if text is None:
                exif = im.getexif().get_ifd(0x8769).get(0x9286)  # UserComment
                if isinstance(exif, bytes):
                    text = exif[8:].decode("utf-16-be" if exif[:8] == b"UNICODE\0" else "utf-8", errors="replace")
                elif isinstance(exif, str):
                    text = exif
    except OSError as err:
        raise StudioError(f"Cannot open {Path(path).name} as an image: {err}", "Pick a PNG made by a webUI.") from None
    if not text:
        raise StudioError(f"{Path(path).name} has no generation parameters.",
                          "Only images saved by A1111, Forge, ComfyUI (A1111 format) or the studio carry them.")
    return parse_infotext(text)
