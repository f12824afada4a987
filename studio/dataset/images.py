"""Opening images safely and turning any supported image into the RGB picture training sees.

Pillow's decompression-bomb limit is set here on purpose (``MAX_PIXELS``): a file whose header
claims more pixels is refused before a single pixel is decoded. Truncated files are never
"repaired" silently (``ImageFile.LOAD_TRUNCATED_IMAGES`` stays off): they are reported instead.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, features

# 120 megapixels: every camera up to 100 MP fits; one decoded image stays under ~360 MB of RAM.
MAX_PIXELS = 120_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
ImageFile.LOAD_TRUNCATED_IMAGES = False
# We refuse oversize images ourselves (with a plain reason), so Pillow's warning is noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

SUPPORTED_EXTS = {".png", ".jpg", ".jpeg", ".jfif", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
SUPPORTED_FORMATS = {"PNG", "JPEG", "MPO", "WEBP", "BMP", "GIF", "TIFF"}
if features.check("avif"):
    SUPPORTED_EXTS.add(".avif")
    SUPPORTED_FORMATS.add("AVIF")
# Image-like files people drop into datasets that the studio cannot train on: reported, not ignored.
UNSUPPORTED_EXTS = {".heic", ".heif", ".svg", ".psd", ".xcf", ".raw", ".cr2", ".cr3", ".nef", ".arw", ".dng",
                    ".orf", ".rw2", ".jxl", ".exr", ".hdr", ".ico", ".eps", ".pdf", ".jp2", ".tga", ".kra"}
if not features.check("avif"):
    UNSUPPORTED_EXTS.add(".avif")

ORIENTATION_TAG = 0x0112
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}  # rotations by 90 / 270 degrees


class ImageRefused(Exception):
    """An image file the studio will not use; ``str()`` is the plain reason shown to the user."""


def open_image(source: str | os.PathLike | bytes, name: str = "") -> Image.Image:
    """Open an image (header only) and refuse decompression bombs. Does not decode pixels."""
    fp = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        im = Image.open(fp)
    except Image.DecompressionBombError as err:
        raise ImageRefused(_bomb_reason(err)) from err
    w, h = im.size
    if w * h > MAX_PIXELS:
        raise ImageRefused(f"its header claims {w}x{h} ({w * h / 1e6:.0f} megapixels), over the "
                           f"{MAX_PIXELS // 1_000_000}-megapixel safety limit: a decompression bomb or a "
                           "damaged header")
    if w <= 0 or h <= 0:
        raise ImageRefused(f"its header claims an empty size ({w}x{h})")
    return im


def _bomb_reason(err: Exception) -> str:
    import re

    m = re.search(r"\((\d+) pixels\)", str(err))
    pixels = f" ({int(m.group(1)) / 1e6:.0f} megapixels)" if m else ""
    return (f"its header claims a huge size{pixels}, over the {MAX_PIXELS // 1_000_000}-megapixel safety "
            "limit: a decompression bomb or a damaged header")


def exif_orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(ORIENTATION_TAG, 1) or 1)
    except Exception:  # a broken EXIF block is not worth refusing the picture for
        return 1


def oriented_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) as the image is meant to be seen, after its EXIF rotation."""
    w, h = im.size
    return (h, w) if exif_orientation(im) in _SWAPPING_ORIENTATIONS else (w, h)


def has_transparency(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode in ("P", "L", "RGB") and "transparency" in im.info)


def conversion_notes(im: Image.Image) -> list[str]:
    """What ``load_image`` will do to this picture, in words (for the check report)."""
    notes = []
    orientation = exif_orientation(im)
    if orientation != 1:
        notes.append(f"EXIF rotation applied (orientation {orientation})")
    if has_transparency(im):
        notes.append("transparency flattened onto the background colour")
    if im.mode == "CMYK":
        notes.append("CMYK converted to RGB")
    elif im.mode.startswith("I") or im.mode == "F":
        notes.append("16-bit converted to 8-bit")
    elif im.mode == "P":
        notes.append("palette converted to RGB")
    if getattr(im, "n_frames", 1) > 1:
        notes.append("animated: the first frame is used")
    return notes


def to_rgb(im: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert a decoded image of any mode to RGB: transparency flattened, high bit depths scaled."""
    if im.mode == "RGB" and "transparency" not in im.info:
        return im
    if im.mode.startswith("I") or im.mode == "F":
        arr = np.asarray(im).astype(np.float64)
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        if im.mode == "F" and arr.max(initial=0) <= 1.0:
            top = 1.0
        im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "CMYK":
        return im.convert("RGB")
    if has_transparency(im) or im.mode == "P":
        im = im.convert("RGBA")
        flat = Image.new("RGB", im.size, tuple(background))
        flat.paste(im, mask=im.getchannel("A"))
        return flat
    return im.convert("RGB")


def load_image(path: str | os.PathLike, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """The picture as training sees it: RGB, EXIF-rotated, transparency flattened on ``background``,
    CMYK / 16-bit / palette converted. Raises ``ImageRefused`` for files the checks would exclude."""
    p = Path(path)
    with open(p, "rb") as fh:
        data = fh.read()
    if not data:
        raise ImageRefused("the file is empty (0 bytes)")
    im = open_image(data, p.name)
    try:
        im.load()
    except Image.DecompressionBombError as err:
        raise ImageRefused(_bomb_reason(err)) from err
    except Exception as err:
        raise ImageRefused(decode_reason(err)) from err
    im = ImageOps.exif_transpose(im) or im
    return to_rgb(im, background)


def decode_reason(err: Exception) -> str:
    msg = str(err).strip() or type(err).__name__
    if "truncated" in msg.lower():
        return f"the file is truncated: it ends before the picture does ({msg})"
    return f"the file is corrupt: its pixels cannot be decoded ({msg})"
