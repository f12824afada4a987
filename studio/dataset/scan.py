"""Find a dataset's images and captions: the kohya folder convention.

A dataset folder holds images with same-name ``.txt`` captions (``.caption`` is read too). It may
instead (or also) hold kohya subfolders named ``N_name``: N is how often each image in it is
repeated per epoch and ``name`` its class words ("10_sks dog"). A subfolder named ``reg`` (or
``regularization``), or a separate folder passed as ``reg_dir``, holds regularisation images in the
same layout. Other plain subfolders are used with 1 repeat. Hidden files and folders are ignored.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from studio.dataset.checks import ImageInfo, Problem, check_image, find_duplicates, is_image_name
from studio.errors import StudioError

CAPTION_EXTS = (".txt", ".caption")
REG_DIR_NAMES = ("reg", "regularization", "regularisation")
KOHYA_DIR = re.compile(r"^(\d+)_(.*)$")


@dataclass
class DatasetItem:
    image_path: Path
    caption: str = ""  # "" when the image has no caption file
    repeats: int = 1
    subset: str = ""  # the kohya subfolder ("10_sks dog"), or "" for images in the dataset root
    is_reg: bool = False
    size: tuple[int, int] = (0, 0)  # (width, height) after EXIF rotation
    notes: list[str] = field(default_factory=list)  # conversions applied when loading

    @property
    def caption_path(self) -> Path:
        return caption_path(self.image_path)

    @property
    def class_tokens(self) -> str:
        """The words of a kohya folder name ("10_sks dog" -> "sks dog"); kohya's caption fallback."""
        m = KOHYA_DIR.match(self.subset)
        return (m.group(2) if m else self.subset).strip()

    @property
    def effective_caption(self) -> str:
        """What training uses: the caption, or the folder's class words when there is none."""
        return self.caption or self.class_tokens


@dataclass
class Dataset:
    root: Path
    items: list[DatasetItem] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    reg_dir: Path | None = None

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def train_items(self) -> list[DatasetItem]:
        return [i for i in self.items if not i.is_reg]

    @property
    def reg_items(self) -> list[DatasetItem]:
        return [i for i in self.items if i.is_reg]

    def subsets(self) -> dict[str, list[DatasetItem]]:
        out: dict[str, list[DatasetItem]] = {}
        for item in self.items:
            out.setdefault(item.subset, []).append(item)
        return out


def caption_path(image_path: Path) -> Path:
    return Path(image_path).with_suffix(".txt")


def read_caption(image_path: Path) -> str:
    """The caption of an image: its ``.txt`` file, else its ``.caption`` file, else ""."""
    for ext in CAPTION_EXTS:
        p = Path(image_path).with_suffix(ext)
        if p.is_file():
            raw = p.read_bytes()
            text = raw.decode("utf-8-sig", errors="replace")
            return " ".join(text.split())  # one line; kohya reads the first line only, we keep all words
    return ""


def _visible(entries) -> list[Path]:
    return sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)


def _find_images(folder: Path, problems: list[Problem], is_subset: bool) -> list[Path]:
    """Images directly in ``folder``; folders inside a subset are reported and skipped (kohya reads
    one level)."""
    images = []
    for entry in _visible(folder.iterdir()):
        if entry.is_file() and is_image_name(entry):
            images.append(entry)
        elif entry.is_dir() and is_subset:
            problems.append(Problem(entry, "folders inside a subset folder are not read; move its images up "
                                           "one level", "warning"))
    return images


def _subset_folders(root: Path) -> list[tuple[Path, str, int]]:
    """(folder, subset name, repeats) for the root and each usable subfolder of ``root``."""
    out = [(root, "", 1)]
    for entry in _visible(root.iterdir()):
        if not entry.is_dir() or entry.name.lower() in REG_DIR_NAMES:
            continue
        m = KOHYA_DIR.match(entry.name)
        out.append((entry, entry.name, max(1, int(m.group(1))) if m else 1))
    return out


def scan_dataset(path: str | os.PathLike, reg_dir: str | os.PathLike | None = None,
                 check_duplicates: bool = True, workers: int | None = None) -> Dataset:
    """Find, check and describe every image of a dataset. Reads files only; never writes.

    Files with an error are listed in ``problems`` and left out of ``items``; files with a warning
    are in both.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise StudioError(f"The dataset folder {root} does not exist or is not a folder.",
                          "Check the path, or bring the images in from the Dataset tab.")
    root = root.resolve()
    problems: list[Problem] = []
    found: list[tuple[Path, str, int, bool]] = []  # (image, subset, repeats, is_reg)
    for folder, subset, repeats in _subset_folders(root):
        found += [(img, subset, repeats, False) for img in _find_images(folder, problems, bool(subset))]
    reg_root = Path(reg_dir).expanduser().resolve() if reg_dir else next(
        (e for e in _visible(root.iterdir()) if e.is_dir() and e.name.lower() in REG_DIR_NAMES), None)
    if reg_dir and not reg_root.is_dir():
        raise StudioError(f"The regularisation folder {reg_root} does not exist.", "Check the path.")
    if reg_root is not None:
        for folder, subset, repeats in _subset_folders(reg_root):
            found += [(img, subset or reg_root.name, repeats, True)
                      for img in _find_images(folder, problems, folder != reg_root)]

    n_workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        infos: list[ImageInfo] = list(pool.map(lambda f: check_image(f[0]), found))

    for info in infos:
        problems += info.problems
    if check_duplicates:
        problems += find_duplicates(infos)
    excluded = {p.path for p in problems if p.severity == "error"}
    items = [DatasetItem(image_path=img, caption=read_caption(img), repeats=repeats, subset=subset,
                         is_reg=is_reg, size=info.size, notes=list(info.notes))
             for (img, subset, repeats, is_reg), info in zip(found, infos) if img not in excluded]
    problems += _orphan_captions(root, found) + _shared_captions([i.image_path for i in items])
    order = {img: i for i, (img, *_rest) in enumerate(found)}
    problems.sort(key=lambda p: (order.get(p.path, len(order)), p.severity != "error"))
    return Dataset(root=root, items=items, problems=problems, reg_dir=reg_root)


def _shared_captions(images: list[Path]) -> list[Problem]:
    """"a.jpg" and "a.png" in one folder would both read "a.txt": say so for the second one."""
    seen: dict[Path, Path] = {}
    out = []
    for img in images:
        first = seen.setdefault(img.with_suffix(""), img)
        if first is not img:
            out.append(Problem(img, f"shares the caption file {caption_path(img).name} with {first.name}; "
                                    "rename one of them", "warning"))
    return out


def _orphan_captions(root: Path, found) -> list[Problem]:
    images = {img.with_suffix("") for img, *_ in found}
    folders = {img.parent for img, *_ in found} | {root}
    out = []
    for folder in sorted(folders):
        for cap in _visible(folder.glob("*.txt")):
            if cap.with_suffix("") not in images and cap.is_file():
                out.append(Problem(cap, "a caption file without an image of the same name", "warning"))
    return out
