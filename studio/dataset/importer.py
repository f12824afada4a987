"""Bringing a dataset in: copy a folder, unpack a zip, or take uploaded files into the workspace,
or use a folder where it is ("in place").

Originals are only ever read. A copy is assembled in a hidden temporary folder and renamed into
place when complete, so a failed or cancelled import never leaves half a dataset behind. Zips are
unpacked defensively: no paths outside the target, no links, and a cap on the unpacked size.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Iterable

from studio.dataset.checks import is_image_name
from studio.dataset.scan import CAPTION_EXTS
from studio.errors import StudioError
from studio.fileio import atomic_write_json
from studio.places import Workspace

MAX_UNPACKED_BYTES = 20 * 1024**3  # a zip that claims more than 20 GB unpacked is refused
MAX_RATIO = 250  # compressed images barely shrink; a member that inflates 250x is a zip bomb
LINKED_FILE = "linked.json"  # in-place datasets the studio remembers, inside workspace/datasets


def is_dataset_file(path: Path) -> bool:
    return is_image_name(path) or path.suffix.lower() in CAPTION_EXTS


def safe_name(name: str) -> str:
    cleaned = re.sub(r"[^\w .-]+", "_", name).strip(" ._")
    return cleaned[:80] or "dataset"


def unique_folder(parent: Path, name: str) -> Path:
    base = safe_name(name)
    candidate, n = parent / base, 2
    while candidate.exists():
        candidate, n = parent / f"{base}-{n}", n + 1
    return candidate


class _Staging:
    """A hidden folder beside the final one; ``commit`` renames it into place, else it is removed."""

    def __init__(self, datasets: Path, name: str):
        datasets.mkdir(parents=True, exist_ok=True)
        self.final = unique_folder(datasets, name)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".importing-{self.final.name}-", dir=datasets))

    def __enter__(self) -> "_Staging":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def commit(self) -> Path:
        if not any(self.tmp.rglob("*")):
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise StudioError("Nothing to import: no images or captions were found.",
                              "Choose a folder, zip or files that contain .png, .jpg or .webp images.")
        os.replace(self.tmp, self.final)
        return self.final


def import_folder(src: str | os.PathLike, workspace: Workspace, name: str | None = None) -> Path:
    """Copy a dataset folder (images, captions, kohya subfolders) into the workspace."""
    source = _existing_folder(src)
    with _Staging(workspace.datasets, name or source.name) as stage:
        for path in sorted(source.rglob("*")):
            rel = path.relative_to(source)
            if any(part.startswith(".") for part in rel.parts) or path.is_symlink() or not path.is_file():
                continue
            if is_dataset_file(path) and len(rel.parts) <= 3:  # root / N_name / file, reg / N_name / file
                (stage.tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, stage.tmp / rel)
        return stage.commit()


def import_zip(zip_path: str | os.PathLike, workspace: Workspace, name: str | None = None) -> Path:
    zp = Path(zip_path)
    with _Staging(workspace.datasets, name or zp.stem) as stage:
        extract_zip(zp, stage.tmp)
        return stage.commit()


def import_files(paths: Iterable[str | os.PathLike], workspace: Workspace, name: str = "upload") -> Path:
    """Uploaded files (images, captions, zips) into one new dataset folder."""
    with _Staging(workspace.datasets, name) as stage:
        for p in map(Path, paths):
            if p.suffix.lower() == ".zip":
                extract_zip(p, stage.tmp)
            elif is_dataset_file(p):
                shutil.copy2(p, stage.tmp / p.name)
        return stage.commit()


def extract_zip(zip_path: Path, dest: Path) -> None:
    """Unpack the dataset files of a zip into ``dest`` (a single top folder is dropped)."""
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as err:
        raise StudioError(f"{zip_path.name} is not a readable zip file ({err}).",
                          "Create the zip again, or upload the images themselves.") from err
    with zf:
        members = []
        for info in zf.infolist():
            parts = PurePosixPath(info.filename.replace("\\", "/")).parts
            if info.filename.startswith(("/", "\\")) or ".." in parts or re.match(r"^[A-Za-z]:", info.filename):
                raise StudioError(f"{zip_path.name} was refused: the entry {info.filename!r} points outside the "
                                  "folder it is unpacked into.", "Zip the dataset folder again with a normal tool.")
            if info.is_dir() or not parts or parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts):
                continue
            if stat.S_ISLNK(info.external_attr >> 16):
                continue  # links could point anywhere on this machine
            if not is_dataset_file(PurePosixPath(*parts)):
                continue
            if info.file_size > 100 * 1024**2 and info.file_size > MAX_RATIO * max(1, info.compress_size):
                raise StudioError(f"{zip_path.name} was refused: {info.filename} would inflate "
                                  f"{info.file_size // max(1, info.compress_size)} times (a zip bomb).",
                                  "Zip the images themselves.")
            members.append((info, parts))
        total = sum(info.file_size for info, _ in members)
        if total > MAX_UNPACKED_BYTES:
            raise StudioError(f"{zip_path.name} would unpack to {total / 1024**3:.1f} GB, over the "
                              f"{MAX_UNPACKED_BYTES // 1024**3} GB limit.", "Split the dataset, or import the folder.")
        tops = {parts[0] for _, parts in members}
        strip = 1 if len(tops) == 1 and all(len(parts) > 1 for _, parts in members) else 0
        for info, parts in members:
            target = dest.joinpath(*parts[strip:])
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)


def _existing_folder(src: str | os.PathLike) -> Path:
    p = Path(src).expanduser()
    if not p.is_dir():
        raise StudioError(f"{p} does not exist or is not a folder.", "Check the path.")
    return p.resolve()


# --- in place ---------------------------------------------------------------------------------------

def _linked_path(workspace: Workspace) -> Path:
    return workspace.datasets / LINKED_FILE


def linked_datasets(workspace: Workspace) -> list[Path]:
    try:
        raw = json.loads(_linked_path(workspace).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [Path(p) for p in raw if isinstance(p, str)]


def use_in_place(src: str | os.PathLike, workspace: Workspace) -> Path:
    """Use a folder where it is (remembered in the workspace). Nothing is copied; captioning and caption
    edits will write ``.txt`` files into that folder."""
    folder = _existing_folder(src)
    known = linked_datasets(workspace)
    if folder not in known:
        atomic_write_json(_linked_path(workspace), [str(p) for p in known + [folder]])
    return folder


def list_datasets(workspace: Workspace) -> list[Path]:
    """Datasets in the workspace, then in-place ones that still exist."""
    own = sorted(p for p in workspace.datasets.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if workspace.datasets.is_dir() else []
    return own + [p for p in linked_datasets(workspace) if p.is_dir() and p not in own]
