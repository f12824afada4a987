"""Captioning throughput: batched vs one image at a time, on the tiny random BLIP (offline).

    python bench/caption.py [--images 32] [--batch 16]

Prints images/s for each; the same loop (``caption_dataset``) the Dataset tab and CLI run,
including loading each image and writing each caption atomically.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    import torch
    from PIL import Image

    from studio.dataset import scan_dataset
    from studio.dataset.captioners import caption_dataset, get_captioner
    from studio.dataset.tiny_blip import save_tiny_blip

    torch.set_num_threads(min(2, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        model = save_tiny_blip(Path(tmp) / "blip")
        data = Path(tmp) / "data"
        data.mkdir()
        for i in range(args.images):
            Image.new("RGB", (320, 256), (i * 7 % 256, 120, 200)).save(data / f"{i:03d}.png")
        caption_dataset(scan_dataset(data), get_captioner("blip", model=str(model), device=args.device),
                        batch_size=args.batch, overwrite=True)  # warm-up: first-call overheads
        print(f"tiny BLIP, {args.images} images of 320x256, device {args.device}")
        for batch in (1, args.batch):
            captioner = get_captioner("blip", model=str(model), device=args.device)
            report = caption_dataset(scan_dataset(data), captioner, batch_size=batch, overwrite=True)
            print(f"  batch {batch:3}: {report.images_per_second:7.1f} images/s "
                  f"({report.written} images in {report.seconds:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
