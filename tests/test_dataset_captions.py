"""Caption edits, kohya tag tables, the template captioner and `studio caption`."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from studio.cli import main
from studio.dataset import captions as C
from studio.dataset import scan_dataset
from studio.dataset.captioners import TemplateCaptioner, caption_dataset, get_captioner, name_words
from studio.errors import StudioError


def make_image(path: Path, color="red", size=(256, 256)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


@pytest.fixture
def kohya(tmp_path) -> Path:
    root = tmp_path / "ds"
    make_image(root / "10_sks dog" / "IMG_0001_red-ball.png", "red")
    make_image(root / "10_sks dog" / "on_grass.png", "green", (256, 320))
    make_image(root / "2_style" / "blue.png", "blue", (320, 256))
    make_image(root / "reg" / "1_dog" / "r1.png", "yellow")
    (root / "10_sks dog" / "on_grass.txt").write_text("sks dog, Grass, grass, sitting", encoding="utf-8")
    (root / "2_style" / "blue.txt").write_text("blue, flat colour", encoding="utf-8")
    return root


def test_tag_edits():
    assert C.add_trigger("dog, grass", "sks") == "sks, dog, grass"
    assert C.add_trigger("dog, sks, grass", "sks") == "sks, dog, grass"  # moved, not doubled
    assert C.add_trigger("dog, grass", "sks", at_end=True) == "dog, grass, sks"
    assert C.find_replace("a dog, dog bed", "dog", "cat") == "a cat, cat bed"
    assert C.find_replace("a dog, 2 dogs", r"\bdog\b", "cat", regex=True) == "a cat, 2 dogs"
    assert C.remove_tags("sks, Blurry, dog, lowres", ["blurry", "lowres "]) == "sks, dog"
    assert C.dedupe_tags("dog, Dog, grass, dog") == "dog, grass"


def test_tag_frequency_and_dataset_dirs_in_kohya_shape(kohya):
    ds = scan_dataset(kohya)
    assert C.tag_frequency(ds) == {
        # no caption: kohya counts the folder's class words
        "10_sks dog": {"sks dog": 2, "grass": 2, "sitting": 1},
        "2_style": {"blue": 1, "flat colour": 1},
        "1_dog": {"dog": 1},
    }
    assert C.dataset_dirs(ds) == {"10_sks dog": {"n_repeats": 10, "img_count": 2},
                                  "2_style": {"n_repeats": 2, "img_count": 1},
                                  "1_dog": {"n_repeats": 1, "img_count": 1}}
    assert C.tag_table(ds)[:2] == [("grass", 2), ("sks dog", 2)]


def test_bulk_apply_writes_only_changed_captions_atomically(kohya, monkeypatch):
    ds = scan_dataset(kohya)
    writes = []
    real = C.atomic_write_text
    monkeypatch.setattr(C, "atomic_write_text", lambda p, t: writes.append(p) or real(p, t))
    changed = C.apply(ds.items, lambda c: C.add_trigger(c, "sks") if c else c)
    assert changed == 2 and len(writes) == 2
    assert (kohya / "2_style" / "blue.txt").read_text() == "sks, blue, flat colour\n"
    assert C.apply(ds.items, C.dedupe_tags) == 1  # "Grass, grass" only
    assert scan_dataset(kohya).items[1].caption == "sks, sks dog, Grass, sitting"
    assert not list(kohya.rglob("*.tmp"))


def test_name_words_drop_camera_noise():
    assert name_words("IMG_0001_red-ball (2)") == ["red", "ball"]
    assert name_words("myCatOnSofa") == ["my", "cat", "on", "sofa"]


def test_template_captioner_skips_existing_and_overwrites_on_request(kohya):
    ds = scan_dataset(kohya)
    cap = TemplateCaptioner(trigger="sks", class_word="dog")
    report = caption_dataset(ds, cap)
    assert (report.written, report.skipped, report.cancelled) == (2, 2, False)
    assert (kohya / "10_sks dog" / "IMG_0001_red-ball.txt").read_text() == "sks, dog, red ball\n"
    assert (kohya / "reg" / "1_dog" / "r1.txt").read_text() == "sks, dog\n"  # "r1" has no word in it
    assert (kohya / "10_sks dog" / "on_grass.txt").read_text() == "sks dog, Grass, grass, sitting"  # untouched
    again = caption_dataset(scan_dataset(kohya), cap)
    assert (again.written, again.skipped) == (0, 4)
    forced = caption_dataset(scan_dataset(kohya), cap, overwrite=True)
    assert forced.written == 4
    assert (kohya / "10_sks dog" / "on_grass.txt").read_text() == "sks, dog, on grass\n"


def test_unknown_captioner_and_missing_model_are_clear(tmp_path):
    with pytest.raises(StudioError, match="Unknown captioner"):
        get_captioner("magic")
    with pytest.raises(StudioError, match="not downloaded yet, and the studio is offline"):
        get_captioner("blip", model="nobody/no-such-blip").load()
    with pytest.raises(StudioError, match="florence2 model nobody/no-such-florence is not downloaded yet"):
        get_captioner("florence2", model="nobody/no-such-florence").load()


def test_cli_caption_reports_problems_and_exits_0(kohya, capsys):
    (kohya / "10_sks dog" / "broken.jpg").write_bytes(b"not a jpeg at all")
    rc = main(["caption", str(kohya), "--captioner", "template", "--trigger", "sks", "--class", "dog"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "broken.jpg: not an image: the file holds text" in out
    assert "Captioned 2, skipped 2" in out
    assert not (kohya / "10_sks dog" / "broken.txt").exists()
    assert main(["caption", str(kohya / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_buckets_and_check(kohya, capsys):
    assert main(["buckets", str(kohya), "--resolution", "512"]) == 0
    out = capsys.readouterr().out
    assert "512x512" in out and "448x576" in out and "576x448" in out
    assert main(["check", str(kohya)]) == 0
    assert "4 usable images, 0 left out" in capsys.readouterr().out
