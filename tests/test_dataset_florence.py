"""The Florence-2 captioner end to end, offline: a tiny random Florence-2 (transformers' native classes,
built by ``studio.dataset.tiny_florence``) through the real load / process / generate / decode path,
atomic writes, skip-or-overwrite on the next run, and clear errors for folders it cannot load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from studio.dataset import scan_dataset
from studio.dataset.captioners import Florence2Captioner, caption_dataset, get_captioner
from studio.errors import StudioError

pytest.importorskip("transformers")
pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny_florence(tmp_path_factory) -> Path:
    """A randomly initialised Florence-2 (DaViT 2 stages + 1+1 layer BART, 32 wide), saved like a hub folder."""
    import transformers

    if not hasattr(transformers, "Florence2ForConditionalGeneration"):
        pytest.skip(f"transformers {transformers.__version__} has no native Florence-2")
    from studio.dataset.tiny_florence import save_tiny_florence

    return save_tiny_florence(tmp_path_factory.mktemp("florence"))


def make_folder(root: Path, n: int) -> Path:
    root.mkdir(parents=True)  # 256 px: smaller images are refused by the scan
    for i in range(n):
        Image.new("RGB", (256 + 64 * (i % 2), 256), (60 * i % 256, 90, 200)).save(root / f"img{i:02d}.png")
    return root


def florence(model: Path | str, **options) -> Florence2Captioner:
    options.setdefault("max_new_tokens", 8)
    cap = get_captioner("florence2", model=str(model), device="cpu", **options)
    assert isinstance(cap, Florence2Captioner)
    return cap


class Counting:
    """Wraps a captioner's ``caption`` to count the images it was actually asked to caption."""

    def __init__(self, captioner):
        self.batches: list[int] = []
        real = captioner.caption

        def counted(images, items):
            self.batches.append(len(images))
            return real(images, items)

        captioner.caption = counted


def test_tiny_florence_folder_loads_with_the_auto_classes(tiny_florence):
    import transformers

    processor = transformers.AutoProcessor.from_pretrained(tiny_florence)
    assert type(processor).__name__ == "Florence2Processor"
    assert type(processor.image_processor).__name__.endswith("Pil")  # no torchvision needed
    model = transformers.Florence2ForConditionalGeneration.from_pretrained(tiny_florence)
    assert model.config.vision_config.projection_dim == model.config.text_config.d_model
    inputs = processor(text=["<CAPTION>"], images=[Image.new("RGB", (40, 30))], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == processor.num_image_tokens


def test_florence2_captions_a_folder_atomically_then_skips_it(tiny_florence, tmp_path, monkeypatch):
    import studio.fileio

    folder = make_folder(tmp_path / "ds", 4)
    replaced = []
    real_replace = studio.fileio.os.replace

    def spy(src, dst):
        replaced.append((Path(src), Path(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(studio.fileio.os, "replace", spy)
    cap = florence(tiny_florence, trigger="sks", num_beams=2)
    seen = Counting(cap)
    report = caption_dataset(scan_dataset(folder), cap, batch_size=3)
    assert (report.written, report.skipped, report.failed, report.cancelled) == (4, 0, [], False)
    assert seen.batches == [3, 1]
    captions = {p.stem: p.read_text(encoding="utf-8") for p in folder.glob("*.txt")}
    assert sorted(captions) == [f"img{i:02d}" for i in range(4)]
    for text in captions.values():
        assert text.startswith("sks, ") and text.endswith("\n") and text.count("\n") == 1
        words = text[len("sks, "):].split()
        assert words and all(w.isprintable() for w in words), text
        assert "<" not in text  # no special tokens (<s>, </s>, <pad>, <image>) leak into captions
    # every caption went through a temporary file beside it, renamed into place
    assert sorted(dst.name for _, dst in replaced) == sorted(f"{s}.txt" for s in captions)
    for src, dst in replaced:
        assert src.parent == dst.parent and src.name.startswith(f".{dst.name}.") and src.suffix == ".tmp"
    assert sorted(p.name for p in folder.iterdir()) == sorted([f"img{i:02d}.png" for i in range(4)]
                                                             + [f"img{i:02d}.txt" for i in range(4)])
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.txt")}

    again = florence(tiny_florence, trigger="sks")
    seen_again = Counting(again)
    second = caption_dataset(scan_dataset(folder), again, batch_size=3)
    assert (second.written, second.skipped) == (0, 4) and seen_again.batches == []
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.txt")} == stamps

    (folder / "img01.txt").unlink()  # a new image without a caption: only it is captioned
    third = caption_dataset(scan_dataset(folder), again, batch_size=3)
    assert (third.written, third.skipped) == (1, 3) and seen_again.batches == [1]

    forced = florence(tiny_florence, detail="short", num_beams=1)
    seen_forced = Counting(forced)
    redo = caption_dataset(scan_dataset(folder), forced, batch_size=4, overwrite=True)
    assert (redo.written, redo.skipped) == (4, 0) and seen_forced.batches == [4]
    assert all(not p.read_text().startswith("sks") and p.read_text().strip() for p in folder.glob("*.txt"))
    assert not [p for p in folder.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_half_precision_casts_pixels_but_not_token_ids(tiny_florence):
    """On a GPU the model runs in float16: pixel values must follow, input ids must stay integers."""
    import torch

    cap = florence(tiny_florence, num_beams=1)
    cap.load()
    cap.dtype = torch.bfloat16  # what _torch_setup picks for cuda (float16), in a dtype the CPU runs
    cap._model = cap._model.to(torch.bfloat16)
    seen = {}
    real_generate = cap._model.generate

    def generate(**inputs):
        seen.update({k: v.dtype for k, v in inputs.items() if hasattr(v, "dtype")})
        return real_generate(**inputs)

    cap._model.generate = generate
    texts = cap.caption([Image.new("RGB", (40, 30), (200, 0, 0)), Image.new("RGB", (30, 40))], [])
    assert seen["pixel_values"] == torch.bfloat16 and seen["input_ids"] == torch.int64
    assert len(texts) == 2 and all(cap.finish(t) for t in texts)


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(StudioError, match="neither a folder nor a hub id"):
        florence(tmp_path / "no" / "such" / "folder").load()


def test_hub_id_not_downloaded_while_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(StudioError, match="not downloaded yet"):
        florence("someone/not-a-cached-florence").load()


def _original_format(folder: Path, tiny: Path) -> None:
    """The layout of the original microsoft/Florence-2 checkpoints (remote code), not converted."""
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json"):
        shutil.copy(tiny / name, folder / name)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["Florence2ForConditionalGeneration"], "model_type": "florence2",
        "auto_map": {"AutoConfig": "configuration_florence2.Florence2Config",
                     "AutoModelForCausalLM": "modeling_florence2.Florence2ForConditionalGeneration"},
        "text_config": {"model_type": "florence2_language", "d_model": 768},
        "vision_config": {"model_type": "davit", "dim_embed": [128, 256, 512, 1024]}}), encoding="utf-8")


def _wrong_shapes(folder: Path, tiny: Path) -> None:
    """A valid config whose weights do not fit it."""
    shutil.copytree(tiny, folder, dirs_exist_ok=True)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config["text_config"]["d_model"] = config["vision_config"]["projection_dim"] = 48
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")


def _invalid_config(folder: Path, tiny: Path) -> None:
    shutil.copytree(tiny, folder, dirs_exist_ok=True)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config["vision_config"]["depths"] = "one, one"
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")


@pytest.mark.parametrize("make", [lambda folder, tiny: None, _original_format, _wrong_shapes, _invalid_config],
                         ids=["empty folder", "original remote-code format", "weights of the wrong shape",
                              "invalid config"])
def test_a_folder_that_is_not_a_converted_florence2_is_a_clear_error(tiny_florence, tmp_path, make):
    folder = tmp_path / "model"
    folder.mkdir()
    make(folder, tiny_florence)
    with pytest.raises(StudioError, match="could not be loaded as a native Florence-2 model") as info:
        florence(folder).load()
    assert "florence-community/Florence-2-base" in str(info.value)
