"""The Dataset tab builds, and its handlers do what the buttons promise (no browser)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from studio.errors import StudioError
from studio.places import Settings, Workspace
from ui import dataset_tab as tab
from ui.context import AppContext


@pytest.fixture
def ws(tmp_path) -> Workspace:
    return Workspace(tmp_path / "ws").ensure()


@pytest.fixture
def photos(tmp_path) -> Path:
    root = tmp_path / "photos"
    (root / "5_sks cat").mkdir(parents=True)
    Image.new("RGB", (512, 256), "red").save(root / "5_sks cat" / "wide.png")
    Image.new("RGB", (256, 256), "blue").save(root / "5_sks cat" / "square.png")
    (root / "5_sks cat" / "broken.png").write_text("oops")
    return root


def test_tab_builds(ws):
    import gradio as gr

    with gr.Blocks():
        tab.build(AppContext(settings=Settings(), workspace=ws))


def test_bring_in_check_caption_edit_and_bucket(ws, photos):
    path, msg = tab.bring_in(ws, None, str(photos), "Copy into the workspace", "")
    assert Path(path).parent == ws.datasets and "original folder is unchanged" in msg
    assert tab.dataset_choices(ws) == [path]

    summary, rows = tab.check(path)
    assert "**2** images ready" in summary and "**1** left out" in summary
    assert rows == [["5_sks cat/broken.png", "error", "not an image: the file holds text, though it is named .png"]]

    assert tab.caption(path, "", "template", "", "sks", "cat", False, 4).startswith("Captioned 2")
    assert (Path(path) / "5_sks cat" / "wide.txt").read_text() == "sks, cat, wide\n"
    assert not (photos / "5_sks cat" / "wide.txt").exists(), "the copy is captioned, not the original"

    assert tab.bulk(path, "", "replace", "wide", "panorama") == "Changed 1 of 2 captions."
    assert tab.tag_rows(path) == [["cat", 2], ["sks", 2], ["panorama", 1], ["square", 1]]
    shown, paths = tab.gallery(path)
    assert len(shown) == 2 and shown[1][1] == "sks, cat, panorama" and max(shown[1][0].size) <= 256
    assert tab.save_caption(paths[0], "a blue square") == "Saved square.txt."
    assert "512 x 512" in tab.buckets(path, "", 512, 64) and "704 x 320" in tab.buckets(path, "", 512, 64)
    with pytest.raises(StudioError, match="No dataset chosen"):
        tab.check("")
