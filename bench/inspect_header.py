"""Benchmark: ``inspect`` reads only the header of a large adapter file.

Builds a ~110 MB kohya LoRA (SDXL names, rank 128, fp16) in a temp folder, then measures time and
bytes read (``rchar`` from /proc/self/io, i.e. bytes returned by read() calls) for:

1. ``inspect_file(path)``            header-first (plus each module's 4-byte alpha);
2. ``inspect_file(path, deep=True)`` reads every tensor (NaN check, norms, hash);
3. loading every tensor (``load_adapter(...).state_dict()``) and safetensors' ``load_file``.

Run: ``.venv/bin/python bench/inspect_header.py``
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rchar() -> int:
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def measure(label: str, fn) -> None:
    b0, t0 = rchar(), time.perf_counter()
    fn()
    dt, db = time.perf_counter() - t0, rchar() - b0
    print(f"{label:42} {dt * 1000:9.1f} ms {db / 1e6:10.3f} MB read" if db >= 0 else f"{label:42} {dt * 1000:9.1f} ms")


def main() -> int:
    import torch
    from safetensors.torch import load_file

    from studio.adapters import load_adapter, save_adapter
    from studio.adapters.inspect import inspect_file

    with tempfile.TemporaryDirectory() as tmp:
        modules = {}
        g = torch.Generator().manual_seed(0)
        for b in range(4, 9):
            for t in range(10):
                for part in ("attn1_to_q", "attn1_to_k", "attn1_to_v", "attn1_to_out_0"):
                    name = f"lora_unet_input_blocks_{b}_1_transformer_blocks_{t}_{part}"
                    modules[name] = {"lora_down.weight": torch.randn(128, 1280, generator=g) * 0.01,
                                     "lora_up.weight": torch.randn(1280, 128, generator=g) * 0.01,
                                     "alpha": torch.tensor(64.0)}
        path = save_adapter(Path(tmp) / "big.safetensors", modules, "sdxl")
        size = path.stat().st_size
        print(f"file: {size / 1e6:.1f} MB, {len(modules)} modules\n")
        small = save_adapter(Path(tmp) / "small.safetensors", dict(list(modules.items())[:2]), "sdxl")
        inspect_file(small, deep=True)  # warm imports so they are not counted
        measure("inspect (header only)", lambda: inspect_file(path))
        measure("inspect --deep (every tensor)", lambda: inspect_file(path, deep=True))
        measure("load_adapter + every tensor", lambda: load_adapter(path).state_dict())
        measure("safetensors load_file (mmap; rchar misses it)", lambda: load_file(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
