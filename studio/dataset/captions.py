"""Captions: read, write (atomically), bulk edits, and the tag counts kohya stores in a LoRA.

A caption is comma-separated tags ("sks dog, sitting, grass") or a sentence (one tag). Bulk edits
work on tags and return the new text; ``apply`` writes only the captions that changed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Iterable

from studio.dataset.scan import Dataset, DatasetItem, caption_path, read_caption
from studio.fileio import atomic_write_text

__all__ = ["read_caption", "write_caption", "split_tags", "join_tags", "add_trigger", "find_replace",
           "remove_tags", "dedupe_tags", "apply", "tag_frequency", "dataset_dirs", "tag_table"]


def write_caption(image_path: Path, text: str) -> Path:
    """Write an image's ``.txt`` caption atomically (one line, UTF-8)."""
    return atomic_write_text(caption_path(image_path), " ".join(text.split()) + "\n")


def split_tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.split(",") if t.strip()]


def join_tags(tags: Iterable[str]) -> str:
    return ", ".join(tags)


def add_trigger(caption: str, trigger: str, at_end: bool = False) -> str:
    """Put the trigger word first (or last); a trigger already among the tags is moved, not doubled."""
    trigger = trigger.strip()
    if not trigger:
        return caption
    tags = [t for t in split_tags(caption) if t.lower() != trigger.lower()]
    return join_tags(tags + [trigger] if at_end else [trigger] + tags)


def find_replace(caption: str, find: str, replace: str, regex: bool = False) -> str:
    if not find:
        return caption
    if regex:
        return re.sub(find, replace, caption)
    return caption.replace(find, replace)


def remove_tags(caption: str, tags: Iterable[str]) -> str:
    drop = {t.strip().lower() for t in tags if t.strip()}
    return join_tags(t for t in split_tags(caption) if t.lower() not in drop)


def dedupe_tags(caption: str) -> str:
    seen: set[str] = set()
    out = []
    for t in split_tags(caption):
        if t.lower() not in seen:
            seen.add(t.lower())
            out.append(t)
    return join_tags(out)


def apply(items: Iterable[DatasetItem], edit: Callable[[str], str]) -> int:
    """Apply ``edit`` to each item's caption; write (atomically) and update those that changed."""
    changed = 0
    for item in items:
        new = " ".join(edit(item.caption).split())
        if new != item.caption:
            write_caption(item.image_path, new)
            item.caption = new
            changed += 1
    return changed


def _subset_dir_name(dataset: Dataset, item: DatasetItem) -> str:
    """kohya keys its tables by the image folder's base name; root images use the root's name."""
    if item.subset:
        return item.subset
    return (dataset.reg_dir if item.is_reg and dataset.reg_dir else dataset.root).name


def tag_frequency(dataset: Dataset) -> dict[str, dict[str, int]]:
    """``ss_tag_frequency``: {subset folder name: {tag: count}}, as kohya computes it (tags are
    lowercased; an image without a caption counts its folder's class words)."""
    out: dict[str, dict[str, int]] = {}
    for item in dataset.items:
        counts = out.setdefault(_subset_dir_name(dataset, item), {})
        for tag in item.effective_caption.split(","):
            tag = tag.strip().lower()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return out


def dataset_dirs(dataset: Dataset) -> dict[str, dict[str, int]]:
    """``ss_dataset_dirs``: {subset folder name: {"n_repeats": n, "img_count": m}}."""
    out: dict[str, dict[str, int]] = {}
    for item in dataset.items:
        entry = out.setdefault(_subset_dir_name(dataset, item), {"n_repeats": item.repeats, "img_count": 0})
        entry["img_count"] += 1
    return out


def tag_table(dataset: Dataset) -> list[tuple[str, int]]:
    """All tags over every subset, most frequent first (ties alphabetical): the UI's table."""
    total: dict[str, int] = {}
    for counts in tag_frequency(dataset).values():
        for tag, n in counts.items():
            total[tag] = total.get(tag, 0) + n
    return sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))
