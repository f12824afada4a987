"""Scanning and checking a folder of good and bad images; load_image; buckets."""

from __future__ import annotations

import hashlib
import io
import random
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from studio.dataset import load_image, scan_dataset
from studio.dataset.buckets import assign_bucket, assign_buckets, bucket_histogram, fit_to_bucket, make_buckets
from studio.dataset.images import ImageRefused
from studio.errors import StudioError


def picture(seed: int, size=(256, 256), mode="RGB") -> Image.Image:
    """A smooth random picture: distinct per seed, robust to re-encoding (so near-duplicate
    detection has something real to tell apart)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    return small.resize(size, Image.Resampling.BICUBIC).convert(mode)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# file -> (severity or None for a clean file, words the reason must contain)
EXPECTED = {
    "portrait.jpg": (None, ""),
    "landscape.png": (None, ""),
    "square.webp": (None, ""),
    "cmyk.jpg": (None, ""),
    "rgba.png": (None, ""),
    "rotated.jpg": (None, ""),
    "gray16.png": (None, ""),
    "palette.png": (None, ""),
    "corrupt.png": ("error", "corrupt"),
    "empty.jpg": ("error", "empty (0 bytes)"),
    "truncated.jpg": ("error", "truncated"),
    "one_pixel.png": ("error", "too small"),
    "bomb.png": ("error", "decompression bomb"),
    "text.png": ("error", "holds text"),
    "photo.heic": ("error", "unsupported format"),
    "copy_of_portrait.jpg": ("error", "exact duplicate of portrait.jpg"),
    "landscape_resaved.jpg": ("warning", "near duplicate of landscape.png"),
    "small.png": ("warning", "short side under 256"),
    "portrait.png": ("warning", "shares the caption file portrait.txt with portrait.jpg"),
    "orphan.txt": ("warning", "without an image"),
}


@pytest.fixture
def messy(tmp_path) -> Path:
    root = tmp_path / "messy"
    root.mkdir()
    w = lambda name, data: (root / name).write_bytes(data)  # noqa: E731
    good_jpg = encode(picture(1, (256, 320)), "JPEG", quality=92)
    w("portrait.jpg", good_jpg)
    w("landscape.png", encode(picture(2, (320, 256)), "PNG"))
    w("square.webp", encode(picture(3), "WEBP", quality=90))
    w("cmyk.jpg", encode(picture(4, mode="CMYK"), "JPEG"))
    rgba = picture(5).convert("RGBA")
    rgba.putalpha(Image.new("L", rgba.size, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 64, 64))  # a fully transparent corner
    w("rgba.png", encode(rgba, "PNG"))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    w("rotated.jpg", encode(picture(6, (384, 256)), "JPEG", exif=exif.tobytes()))
    gray = np.full((256, 256), 65535, dtype=np.uint16)
    gray[:, :128] = 0
    w("gray16.png", encode(Image.fromarray(gray), "PNG"))
    w("palette.png", encode(picture(7).convert("P", palette=Image.Palette.ADAPTIVE), "PNG"))
    png = bytearray(encode(picture(8), "PNG"))
    at = png.index(b"IDAT")
    png[at + 30:at + 90] = bytes(b ^ 0xFF for b in png[at + 30:at + 90])
    w("corrupt.png", bytes(png))
    w("empty.jpg", b"")
    truncated = encode(picture(9), "JPEG")
    w("truncated.jpg", truncated[: len(truncated) * 6 // 10])
    w("one_pixel.png", encode(Image.new("RGB", (1, 1), "red"), "PNG"))
    w("bomb.png", b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0))
      + png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + png_chunk(b"IEND", b""))
    w("text.png", b"This is not a picture, it is a note someone saved with the wrong name.\n" * 3)
    w("photo.heic", b"\0\0\0\x18ftypheic" + b"\0" * 64)
    w("copy_of_portrait.jpg", good_jpg)
    w("landscape_resaved.jpg", encode(Image.open(root / "landscape.png"), "JPEG", quality=85))
    w("portrait.png", encode(picture(14), "PNG"))
    w("small.png", encode(picture(10, (200, 240)), "PNG"))
    (root / "portrait.txt").write_text("a photo of sks, red\n", encoding="utf-8")
    (root / "orphan.txt").write_text("no picture for me", encoding="utf-8")
    sub = root / "10_sks dog"
    sub.mkdir()
    (sub / "a.png").write_bytes(encode(picture(11), "PNG"))
    (sub / "a.txt").write_text("sks dog, sitting", encoding="utf-8")
    (sub / "b.png").write_bytes(encode(picture(12), "PNG"))
    reg = root / "reg" / "1_dog"
    reg.mkdir(parents=True)
    (reg / "r.png").write_bytes(encode(picture(13), "PNG"))
    return root


def test_each_file_is_classified_with_its_reason_and_the_source_is_untouched(messy):
    before = tree_hashes(messy)
    ds = scan_dataset(messy)
    for item in ds.items:  # training loads every kept image; that must not write either
        load_image(item.image_path)

    by_name: dict[str, list] = {}
    for p in ds.problems:
        by_name.setdefault(p.path.name, []).append(p)
    for name, (severity, words) in EXPECTED.items():
        found = by_name.get(name, [])
        if severity is None:
            assert not found, f"{name} should be clean, got {found}"
        else:
            assert [p.severity for p in found] == [severity], f"{name}: {found}"
            assert words in found[0].reason, f"{name}: {found[0].reason!r} lacks {words!r}"
    unexpected = set(by_name) - set(EXPECTED)
    assert not unexpected, f"problems reported for files that have none: {unexpected}"

    kept = {i.image_path.name for i in ds.items}
    errors = {n for n, (s, _) in EXPECTED.items() if s == "error"}
    assert kept.isdisjoint(errors)
    assert kept == {n for n, (s, _) in EXPECTED.items() if s != "error" and not n.endswith(".txt")} | {
        "a.png", "b.png", "r.png"}
    assert tree_hashes(messy) == before, "scanning or loading changed the source folder"
    assert all(p.exists() for p in messy.rglob("*")), "nothing may be deleted"


def test_items_carry_captions_repeats_subsets_sizes_and_notes(messy):
    ds = scan_dataset(messy)
    items = {i.image_path.name: i for i in ds.items}
    assert items["portrait.jpg"].caption == "a photo of sks, red"
    assert (items["portrait.jpg"].repeats, items["portrait.jpg"].subset, items["portrait.jpg"].is_reg) == (1, "", False)
    assert items["landscape.png"].caption == ""
    a, b = items["a.png"], items["b.png"]
    assert (a.repeats, a.subset, a.caption, a.is_reg) == (10, "10_sks dog", "sks dog, sitting", False)
    assert b.caption == "" and b.effective_caption == "sks dog"
    r = items["r.png"]
    assert (r.is_reg, r.repeats, r.subset) == (True, 1, "1_dog")
    assert items["rotated.jpg"].size == (256, 384)  # stored 384x256, EXIF says rotate 90
    assert items["landscape.png"].size == (320, 256)
    assert any("EXIF rotation" in n for n in items["rotated.jpg"].notes)
    assert any("transparency" in n for n in items["rgba.png"].notes)
    assert any("CMYK" in n for n in items["cmyk.jpg"].notes)
    assert any("16-bit" in n for n in items["gray16.png"].notes)
    assert any("palette" in n for n in items["palette.png"].notes)


def test_load_image_converts_everything_to_rgb(messy):
    rotated = load_image(messy / "rotated.jpg")
    assert rotated.mode == "RGB" and rotated.size == (256, 384)
    rgba = load_image(messy / "rgba.png", background=(255, 0, 0))
    assert rgba.mode == "RGB" and rgba.getpixel((5, 5)) == (255, 0, 0)  # flattened on the chosen colour
    assert rgba.getpixel((200, 200)) == picture(5).getpixel((200, 200))
    gray = load_image(messy / "gray16.png")
    assert gray.mode == "RGB" and gray.getpixel((10, 10)) == (0, 0, 0) and gray.getpixel((200, 10)) == (255,) * 3
    assert load_image(messy / "cmyk.jpg").mode == "RGB"
    assert load_image(messy / "palette.png").mode == "RGB"
    for bad, words in [("truncated.jpg", "truncated"), ("bomb.png", "decompression bomb"), ("empty.jpg", "empty")]:
        with pytest.raises(ImageRefused, match=words):
            load_image(messy / bad)


def test_separate_reg_dir_and_missing_folder(tmp_path, messy):
    reg = tmp_path / "my_reg"
    shutil.copytree(messy / "reg", reg)
    shutil.rmtree(messy / "reg")
    ds = scan_dataset(messy / "10_sks dog", reg_dir=reg)
    assert sorted((i.image_path.name, i.is_reg) for i in ds.items) == [("a.png", False), ("b.png", False),
                                                                       ("r.png", True)]
    with pytest.raises(StudioError, match="does not exist"):
        scan_dataset(tmp_path / "nope")


# --- buckets -------------------------------------------------------------------------------------

@pytest.mark.parametrize("resolution", [512, 768, 1024])
def test_buckets_respect_step_area_and_sides(resolution):
    buckets = make_buckets(resolution)
    assert (resolution, resolution) in buckets
    assert len(set(buckets)) == len(buckets)
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0
        assert w * h <= resolution * resolution
        assert 256 <= w <= 2 * resolution and 256 <= h <= 2 * resolution
        assert (h, w) in buckets
    area = make_buckets(768, step=32, max_area=640 * 640, max_side=1024)
    assert all(w % 32 == 0 and h % 32 == 0 and w * h <= 640 * 640 and max(w, h) <= 1024 for w, h in area)


def test_every_image_gets_the_closest_bucket_deterministically():
    rng = random.Random(7)
    sizes = [(rng.randint(64, 4000), rng.randint(64, 4000)) for _ in range(300)] + [(1000, 1000), (640, 480)]
    buckets = make_buckets(512)
    assigned = assign_buckets(sizes, 512)
    assert len(assigned) == len(sizes) and all(b in buckets for b in assigned)
    for (w, h), (bw, bh) in zip(sizes, assigned):
        best = min(abs(np.log(w / h) - np.log(x / y)) for x, y in buckets)
        assert abs(np.log(w / h) - np.log(bw / bh)) <= best + 1e-9
    assert assign_buckets(list(reversed(sizes)), 512) == list(reversed(assigned))
    assert assign_bucket((1000, 1000), list(reversed(buckets))) == (512, 512)  # input order does not matter
    assert assign_bucket((2000, 1000), buckets) == assign_bucket((1000, 2000), buckets)[::-1]
    hist = bucket_histogram(sizes, 512)
    assert sum(hist.values()) == len(sizes)


def test_fit_to_bucket_covers_and_crops():
    out = fit_to_bucket(picture(1, (300, 200)), (576, 384))
    assert out.size == (576, 384)


def test_bad_bucket_settings_are_refused():
    with pytest.raises(StudioError):
        make_buckets(128)  # a 128 square is under the 256 minimum side
