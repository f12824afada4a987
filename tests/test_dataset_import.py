"""Bringing datasets in: folder copy, zip, uploads, in place; originals never change."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from studio.dataset import scan_dataset
from studio.dataset.importer import (import_files, import_folder, import_zip, list_datasets, linked_datasets,
                                     use_in_place)
from studio.errors import StudioError
from studio.places import Workspace


def hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def source(tmp_path) -> Path:
    root = tmp_path / "my photos"
    (root / "10_sks dog").mkdir(parents=True)
    (root / "reg" / "1_dog").mkdir(parents=True)
    Image.new("RGB", (256, 256), "red").save(root / "10_sks dog" / "a.png")
    (root / "10_sks dog" / "a.txt").write_text("sks dog", encoding="utf-8")
    Image.new("RGB", (256, 256), "blue").save(root / "reg" / "1_dog" / "r.jpg")
    (root / "notes.docx").write_bytes(b"not part of a dataset")
    (root / ".DS_Store").write_bytes(b"\0")
    return root


@pytest.fixture
def ws(tmp_path) -> Workspace:
    return Workspace(tmp_path / "ws").ensure()


def test_folder_copy_brings_dataset_files_and_leaves_the_source_alone(source, ws):
    before = hashes(source)
    target = import_folder(source, ws)
    assert target.parent == ws.datasets and target.name == "my photos"
    assert hashes(target) == {k: v for k, v in before.items() if k.endswith((".png", ".txt", ".jpg"))}
    assert hashes(source) == before
    ds = scan_dataset(target)
    assert [(i.subset, i.is_reg, i.caption) for i in ds.items] == [("10_sks dog", False, "sks dog"),
                                                                   ("1_dog", True, "")]
    assert import_folder(source, ws).name == "my photos-2"  # never overwrites an earlier import
    assert not [p for p in ws.datasets.iterdir() if p.name.startswith(".importing")]


def test_zip_import_drops_a_single_top_folder(source, ws, tmp_path):
    zp = tmp_path / "set.zip"
    with zipfile.ZipFile(zp, "w") as zf:
        for p in source.rglob("*"):
            if p.is_file():
                zf.write(p, "my photos/" + str(p.relative_to(source)))
        zf.writestr("__MACOSX/._a.png", b"junk")
    target = import_zip(zp, ws)
    assert sorted(hashes(target)) == ["10_sks dog/a.png", "10_sks dog/a.txt", "reg/1_dog/r.jpg"]


def test_zip_escaping_its_folder_is_refused_and_leaves_nothing(ws, tmp_path):
    zp = tmp_path / "evil.zip"
    with zipfile.ZipFile(zp, "w") as zf:
        zf.writestr("ok.png", b"x")
        zf.writestr("../../escape.png", b"x")
    with pytest.raises(StudioError, match="points outside"):
        import_zip(zp, ws)
    assert not (tmp_path / "escape.png").exists()
    assert list(ws.datasets.iterdir()) == []
    (tmp_path / "bad.zip").write_bytes(b"PK not really")
    with pytest.raises(StudioError, match="not a readable zip"):
        import_zip(tmp_path / "bad.zip", ws)


def test_uploads_and_in_place(source, ws, tmp_path):
    up = import_files([source / "10_sks dog" / "a.png", source / "10_sks dog" / "a.txt", source / "notes.docx"],
                      ws, name="dropped")
    assert sorted(p.name for p in up.iterdir()) == ["a.png", "a.txt"]
    with pytest.raises(StudioError, match="Nothing to import"):
        import_files([source / "notes.docx"], ws)
    before = hashes(source)
    assert use_in_place(source, ws) == source.resolve()
    use_in_place(source, ws)
    assert linked_datasets(ws) == [source.resolve()]
    assert list_datasets(ws) == [up, source.resolve()]
    assert hashes(source) == before
