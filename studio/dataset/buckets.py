"""Aspect-ratio buckets: training sizes near a target pixel area, so wide and tall pictures are
not cropped to squares. The training data loader uses these same functions.

Every bucket has both sides a multiple of ``step``, an area at most ``max_area`` (default
resolution²) and sides between ``min_side`` and ``max_side`` (default 2 x resolution). An image
goes to the bucket whose aspect ratio is closest to its own (compared in log space, so 2:1 and 1:2
are equally far from 1:1); ties go to the larger bucket, then the wider one.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Iterable

from studio.errors import StudioError

Size = tuple[int, int]


def make_buckets(resolution: int, step: int = 64, max_area: int | None = None, min_side: int = 256,
                 max_side: int | None = None) -> list[Size]:
    """All (width, height) buckets for a target resolution, sorted from tallest to widest."""
    if step <= 0 or resolution <= 0:
        raise StudioError(f"Bucket resolution ({resolution}) and step ({step}) must be positive.",
                          "Use e.g. resolution 512, 768 or 1024 with step 64.")
    max_area = max_area or resolution * resolution
    max_side = max_side or resolution * 2
    square = int(math.isqrt(max_area) // step * step)
    if square < min_side or square > max_side:
        raise StudioError(f"No buckets fit: a {square}x{square} square is outside the {min_side}-{max_side} px "
                          "side limits.", "Raise the resolution or lower the minimum side.")
    buckets = {(square, square)}
    width = -(-min_side // step) * step  # the first multiple of step at or above min_side
    while width <= max_side:
        height = min(max_side, max_area // width // step * step)
        if height >= min_side:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    return sorted(buckets, key=lambda b: (b[0] / b[1], b[0]))


def _distance(size: Size, bucket: Size) -> float:
    return abs(math.log(size[0] / size[1]) - math.log(bucket[0] / bucket[1]))


def assign_bucket(size: Size, buckets: list[Size]) -> Size:
    """The bucket for an image of ``size`` (width, height): closest aspect ratio, deterministic."""
    if not buckets:
        raise StudioError("There are no buckets to choose from.", "Check the bucket settings.")
    w, h = size
    if w <= 0 or h <= 0:
        raise StudioError(f"An image of size {w}x{h} cannot be bucketed.", "Run the dataset checks.")
    # Rounding the distance makes exact ties (which float noise would hide) resolve by the rule.
    return min(buckets, key=lambda b: (round(_distance(size, b), 9), -b[0] * b[1], -b[0]))


def assign_buckets(sizes: Iterable[Size], resolution: int, step: int = 64, max_area: int | None = None,
                   **bucket_options) -> list[Size]:
    buckets = make_buckets(resolution, step, max_area, **bucket_options)
    return [assign_bucket(s, buckets) for s in sizes]


def bucket_histogram(sizes: Iterable[Size], resolution: int, step: int = 64, max_area: int | None = None,
                     repeats: Iterable[int] | None = None, **bucket_options) -> dict[Size, int]:
    """How many images (times their repeats, if given) land in each bucket; empty buckets left out,
    sorted from tallest to widest."""
    sizes = list(sizes)
    weights = list(repeats) if repeats is not None else [1] * len(sizes)
    counts: Counter = Counter()
    for bucket, n in zip(assign_buckets(sizes, resolution, step, max_area, **bucket_options), weights):
        counts[bucket] += n
    return dict(sorted(counts.items(), key=lambda kv: (kv[0][0] / kv[0][1], kv[0][0])))


def fit_to_bucket(image, bucket: Size):
    """Resize a PIL image to cover ``bucket`` and centre-crop the overflow: what training feeds in."""
    from PIL import Image

    bw, bh = bucket
    w, h = image.size
    scale = max(bw / w, bh / h)
    nw, nh = max(bw, round(w * scale)), max(bh, round(h * scale))
    resized = image.resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - bw) // 2, (nh - bh) // 2
    return resized.crop((left, top, left + bw, top + bh))
