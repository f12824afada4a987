"""Model captioners end to end, offline: a tiny random BLIP through the real transformers path
(batching, atomic writes, cancel and resume), and a tiny WD14-style ONNX tagger."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from PIL import Image

from studio.dataset import scan_dataset
from studio.dataset.captioners import BlipCaptioner, Wd14Captioner, caption_dataset, get_captioner
from studio.errors import StudioError

@pytest.fixture(scope="session")
def tiny_blip(tmp_path_factory) -> Path:
    """A randomly initialised BLIP captioning model (two 32-wide layers), saved like a hub folder."""
    from studio.dataset.tiny_blip import save_tiny_blip

    return save_tiny_blip(tmp_path_factory.mktemp("blip"))


def make_folder(root: Path, n: int) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (256 + 64 * (i % 2), 256), (40 * i % 256, 90, 200)).save(root / f"img{i:02d}.png")
    return root


class Counting:
    """Wraps a captioner's ``caption`` to count the images it was actually asked to caption."""

    def __init__(self, captioner):
        self.images = 0
        self.batches = []
        real = captioner.caption

        def counted(images, items):
            self.images += len(images)
            self.batches.append(len(images))
            return real(images, items)

        captioner.caption = counted


def test_blip_captions_in_batches_then_resumes_after_cancel(tiny_blip, tmp_path):
    folder = make_folder(tmp_path / "ds", 5)
    blip = get_captioner("blip", model=str(tiny_blip), trigger="sks", device="cpu")
    assert isinstance(blip, BlipCaptioner)
    seen = Counting(blip)
    cancel = threading.Event()
    report = caption_dataset(scan_dataset(folder), blip, batch_size=2,
                             progress=lambda done, total, msg: cancel.set() if done >= 2 else None, cancel=cancel)
    assert report.cancelled and report.written == 2 and seen.batches == [2]
    first = {p.name: (p.read_text(), p.stat().st_mtime_ns) for p in folder.glob("*.txt")}
    assert sorted(first) == ["img00.txt", "img01.txt"]
    for text, _ in first.values():
        assert text.startswith("sks, ") and text.endswith("\n") and len(text.split(",", 1)[1].strip()) > 0

    blip2 = get_captioner("blip", model=str(tiny_blip), trigger="sks", device="cpu")
    seen2 = Counting(blip2)
    resumed = caption_dataset(scan_dataset(folder), blip2, batch_size=2)
    assert (resumed.written, resumed.skipped, resumed.cancelled) == (3, 2, False)
    assert seen2.images == 3 and seen2.batches == [2, 1]  # nothing captioned twice
    assert {p.name: (p.read_text(), p.stat().st_mtime_ns) for p in folder.glob("img0[01].txt")} == first
    assert len(list(folder.glob("*.txt"))) == 5
    assert not [p for p in folder.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_a_failed_write_leaves_the_old_caption_whole(tiny_blip, tmp_path, monkeypatch):
    import studio.fileio

    folder = make_folder(tmp_path / "ds", 1)
    (folder / "img00.txt").write_text("old caption", encoding="utf-8")
    blip = get_captioner("blip", model=str(tiny_blip), device="cpu")

    def disk_full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(studio.fileio.os, "replace", disk_full)
    with pytest.raises(StudioError, match="No space left"):
        caption_dataset(scan_dataset(folder), blip, overwrite=True)
    assert (folder / "img00.txt").read_text() == "old caption"
    assert sorted(p.name for p in folder.iterdir()) == ["img00.png", "img00.txt"]


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(StudioError, match="neither a folder nor a hub id"):
        get_captioner("blip", model=str(tmp_path / "no" / "such" / "folder")).load()


# --- WD14 -------------------------------------------------------------------------------------------

def build_tiny_tagger(folder: Path) -> Path:
    """An ONNX tagger on 8x8 BGR input: mean colour -> 4 tags (rating, red_hair, blue_sky, a character)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.zeros((3, 4), np.float32)
    w[2, 1] = 0.05  # red channel (BGR index 2) -> red_hair
    w[0, 2] = 0.05  # blue channel -> blue_sky
    b = np.array([10.0, -5.0, -5.0, 0.0], np.float32)  # rating always "sure", character never sure enough
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input"], ["mean"], axes=[1, 2], keepdims=0),
         helper.make_node("MatMul", ["mean", "W"], ["logits0"]),
         helper.make_node("Add", ["logits0", "B"], ["logits"]),
         helper.make_node("Sigmoid", ["logits"], ["output"])],
        "tagger",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 8, 8, 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    folder.mkdir(parents=True)
    onnx.save(model, str(folder / "model.onnx"))
    (folder / "selected_tags.csv").write_text(
        "tag_id,name,category,count\n1,general,9,100\n2,red_hair,0,50\n3,blue_sky,0,40\n4,some_character,4,10\n",
        encoding="utf-8")
    return folder


def test_wd14_tagger_on_a_tiny_onnx_model(tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime (optional, for the wd14 tagger) is not installed")
    pytest.importorskip("onnx", reason="onnx is needed to build the tiny test tagger")
    tagger_dir = build_tiny_tagger(tmp_path / "tagger")
    folder = tmp_path / "ds"
    folder.mkdir()
    Image.new("RGB", (256, 256), (255, 0, 0)).save(folder / "red.png")
    Image.new("RGB", (300, 256), (0, 0, 255)).save(folder / "blue.png")
    tagger = get_captioner("wd14", model=str(tagger_dir), trigger="sks")
    assert isinstance(tagger, Wd14Captioner)
    report = caption_dataset(scan_dataset(folder), tagger, batch_size=2)
    assert report.written == 2
    assert (folder / "red.txt").read_text() == "sks, red hair\n"
    assert (folder / "blue.txt").read_text() == "sks, blue sky\n"
