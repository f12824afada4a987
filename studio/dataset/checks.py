"""Checks on each image file, and duplicate detection across a dataset.

Each file is read once: its bytes are hashed (exact duplicates), decoded in full (truncated and
corrupt files fail here), and reduced to a 128-bit difference hash (near duplicates). Nothing is
ever written to, moved or deleted: problem files are only reported and left out of the dataset.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from studio.dataset.images import (SUPPORTED_EXTS, SUPPORTED_FORMATS, UNSUPPORTED_EXTS, ImageRefused,
                                   _bomb_reason, conversion_notes, decode_reason, open_image, oriented_size)

SMALL_SIDE = 256  # short side below this: a warning (it will be upscaled and look soft)
TINY_SIDE = 64  # short side below this: an error (nothing to learn from; 1x1 pixels and icons)
NEAR_DUPLICATE_BITS = 8  # of 128 hash bits; two different photos of one scene differ by far more
NEAR_DUPLICATE_COLOUR = 12  # mean difference (0-255) of 4x4 colour thumbnails; the hash ignores colour


@dataclass
class Problem:
    path: Path
    reason: str
    severity: str = "error"  # "error": the file is left out; "warning": it is used, but look at it

    def __str__(self) -> str:
        return f"{self.severity}: {self.path.name}: {self.reason}"


@dataclass
class ImageInfo:
    """What one check of one file found."""

    path: Path
    size: tuple[int, int] = (0, 0)  # after EXIF rotation
    format: str = ""
    sha256: str = ""
    dhash: tuple[int, int] | None = None
    colours: np.ndarray | None = None  # 4x4 RGB thumbnail, for telling flat or recoloured images apart
    notes: list[str] = field(default_factory=list)  # conversions load_image will apply
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(p.severity == "error" for p in self.problems)


def _looks_like_text(head: bytes) -> bool:
    if not head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    printable = sum(ch.isprintable() or ch in "\r\n\t" for ch in text)
    return printable / len(text) > 0.95


def dhash(im: Image.Image) -> tuple[int, int]:
    """Horizontal and vertical 64-bit difference hashes of a picture."""
    g = np.asarray(im.convert("L").resize((9, 9), Image.Resampling.BILINEAR), dtype=np.int16)
    bits_h = (g[:8, 1:] > g[:8, :-1]).flatten()
    bits_v = (g[1:, :8] > g[:-1, :8]).flatten()
    to_int = lambda bits: int("".join("1" if b else "0" for b in bits), 2)  # noqa: E731
    return to_int(bits_h), to_int(bits_v)


_cache: dict[tuple[str, int, int], ImageInfo] = {}
_cache_lock = threading.Lock()


def check_image(path: str | os.PathLike) -> ImageInfo:
    """Check one image file. Results are cached by (path, size, mtime), so a re-scan is quick."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as err:
        return ImageInfo(p, problems=[Problem(p, f"cannot be read: {err.strerror or err}")])
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    with _cache_lock:
        hit = _cache.get(key)
    if hit is not None:
        return hit
    info = _check_uncached(p)
    with _cache_lock:
        _cache[key] = info
    return info


def _check_uncached(p: Path) -> ImageInfo:
    info = ImageInfo(p)

    def refuse(reason: str) -> ImageInfo:
        info.problems.append(Problem(p, reason, "error"))
        return info

    ext = p.suffix.lower()
    if ext in UNSUPPORTED_EXTS:
        return refuse(f"unsupported format ({ext}): convert it to PNG or JPEG")
    try:
        data = p.read_bytes()
    except OSError as err:
        return refuse(f"cannot be read: {err.strerror or err}")
    if not data:
        return refuse("the file is empty (0 bytes)")
    info.sha256 = hashlib.sha256(data).hexdigest()
    try:
        im = open_image(data, p.name)
    except ImageRefused as err:
        return refuse(str(err))
    except Image.UnidentifiedImageError:
        if _looks_like_text(data[:512]):
            return refuse(f"not an image: the file holds text, though it is named {ext}")
        return refuse(f"not an image, or an image damaged beyond recognition (named {ext}, but no image "
                      "format matches its contents)")
    except Exception as err:  # Pillow raises many types for mangled headers
        return refuse(f"the file is corrupt: its header cannot be read ({err})")
    info.format = im.format or ""
    if info.format not in SUPPORTED_FORMATS:
        return refuse(f"unsupported format: the file is {info.format or 'an unknown'} image; convert it to "
                      "PNG or JPEG")
    try:
        im.load()
    except Image.DecompressionBombError as err:
        return refuse(_bomb_reason(err))
    except Exception as err:
        return refuse(decode_reason(err))
    info.size = oriented_size(im)
    info.notes = conversion_notes(im)
    if info.format == "JPEG" and ext not in (".jpg", ".jpeg", ".jfif") or \
            info.format == "PNG" and ext != ".png" or info.format == "WEBP" and ext != ".webp":
        info.notes.append(f"a {info.format} file named {ext}")
    w, h = info.size
    if min(w, h) < TINY_SIDE:
        return refuse(f"too small to learn from: {w}x{h} pixels (at least {SMALL_SIDE} px on the short "
                      "side is recommended)")
    if min(w, h) < SMALL_SIDE:
        info.problems.append(Problem(p, f"small: {w}x{h}, short side under {SMALL_SIDE} px; it will be "
                                        "upscaled and look soft", "warning"))
    try:
        upright = ImageOps.exif_transpose(im) or im
        info.dhash = dhash(upright)
        info.colours = np.asarray(upright.convert("RGB").resize((4, 4), Image.Resampling.BOX), dtype=np.int16)
    except Exception:  # a hash is a nicety; never fail a good image over it
        info.dhash = info.colours = None
    return info


def _original_first(info: ImageInfo) -> tuple:
    """Which of a group of duplicates is the original: one with a caption, then the shortest name
    ("photo.jpg" before "photo (1).jpg" or "Copy of photo.jpg"), then the path."""
    captioned = any(info.path.with_suffix(ext).is_file() for ext in (".txt", ".caption"))
    return (not captioned, len(info.path.name), str(info.path))


def find_duplicates(infos: list[ImageInfo]) -> list[Problem]:
    """Exact duplicates (same bytes: errors, left out) and near duplicates (warnings, kept).

    Of each group, the original (see ``_original_first``) is kept and the others are reported.
    """
    problems: list[Problem] = []
    groups: dict[str, list[ImageInfo]] = {}
    for info in infos:
        if info.ok and info.sha256:
            groups.setdefault(info.sha256, []).append(info)
    unique: list[ImageInfo] = []
    for group in groups.values():
        original, *copies = sorted(group, key=_original_first)
        problems += [Problem(c.path, f"exact duplicate of {_rel(original.path, c.path)}", "error") for c in copies]
        if original.dhash is not None:
            unique.append(original)
    if len(unique) < 2:
        return problems
    unique.sort(key=_original_first)
    hashes = np.array([info.dhash for info in unique], dtype=np.uint64)
    flagged: set[int] = set()
    for i in range(len(unique) - 1):
        if i in flagged:
            continue
        distance = np.bitwise_count(hashes[i + 1:] ^ hashes[i]).sum(axis=1)
        for j in np.nonzero(distance <= NEAR_DUPLICATE_BITS)[0]:
            k = i + 1 + int(j)
            if k in flagged or np.abs(unique[i].colours - unique[k].colours).mean() > NEAR_DUPLICATE_COLOUR:
                continue
            flagged.add(k)
            problems.append(Problem(unique[k].path, f"near duplicate of {_rel(unique[i].path, unique[k].path)} "
                                                    "(looks almost the same); keep it only if that is intended",
                                    "warning"))
    return problems


def _rel(original: Path, other: Path) -> str:
    """Name the original the shortest clear way: its file name, or its folder too when they differ."""
    return original.name if original.parent == other.parent else f"{original.parent.name}/{original.name}"


def is_image_name(path: Path) -> bool:
    ext = path.suffix.lower()
    return ext in SUPPORTED_EXTS or ext in UNSUPPORTED_EXTS
