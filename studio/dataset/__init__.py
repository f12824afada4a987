"""Datasets: find and check images (``scan_dataset``), load them as training sees them
(``load_image``), bring folders and zips in (``importer``), caption them (``captioners``), edit
captions (``captions``) and bucket them by aspect ratio (``buckets``).

Names are imported lazily so that ``python -m studio --help`` does not load Pillow and numpy.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "scan_dataset": "studio.dataset.scan",
    "Dataset": "studio.dataset.scan",
    "DatasetItem": "studio.dataset.scan",
    "read_caption": "studio.dataset.scan",
    "Problem": "studio.dataset.checks",
    "check_image": "studio.dataset.checks",
    "load_image": "studio.dataset.images",
    "ImageRefused": "studio.dataset.images",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'studio.dataset' has no attribute {name!r}")
