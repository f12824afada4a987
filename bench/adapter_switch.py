"""Cost of changing one adapter weight vs reloading the base model, in one run.

    .venv/bin/python bench/adapter_switch.py [--model tiny:sd1] [--device cpu] [--repeat 5]

Changing a weight recomputes only the tensors that adapter touches, from exact backups; the
alternative a naive tool takes is reloading the base model and re-applying everything.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny:sd1")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    import torch

    from studio.adapters import load_adapter, save_adapter
    from studio.adapters.keymap import build_keymap
    from studio.adapters.lora import from_factors
    from studio.generate.apply import AdapterStack, StackEntry
    from studio.generate.prompt import pipe_family
    from studio.models.loader import load_pipeline

    dtype = torch.float32 if args.device == "cpu" else torch.float16
    t = time.perf_counter()
    pipe = load_pipeline(args.model, args.device, dtype).pipe
    first_load = time.perf_counter() - t
    family = pipe_family(pipe)
    kmap = build_keymap(pipe, family)
    g = torch.Generator().manual_seed(0)
    modules = {}
    for name in kmap.names():  # a LoRA on every Linear of the UNet attention blocks and CLIP (kohya default)
        comp, path = kmap.to_module(name)
        mod = getattr(pipe, comp).get_submodule(path)
        if isinstance(mod, torch.nn.Linear) and ("attentions" in path or comp != "unet"):
            out_f, in_f = mod.weight.shape
            r = min(args.rank, in_f, out_f)
            modules[name] = from_factors(torch.randn(r, in_f, generator=g) * .01,
                                         torch.randn(out_f, r, generator=g) * .01, r)
    with tempfile.TemporaryDirectory() as tmp:
        a = load_adapter(save_adapter(Path(tmp) / "a.safetensors", modules, family))
        b = load_adapter(save_adapter(Path(tmp) / "b.safetensors", modules, family))
        stack = AdapterStack(pipe)
        stack.set([StackEntry(a, 1.0), StackEntry(b, 1.0)])
        sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
        switch, reload = [], []
        for i in range(args.repeat):
            sync()
            t = time.perf_counter()
            stack.set([StackEntry(a, 1.0), StackEntry(b, 0.5 + 0.1 * (i + 1))])
            sync()
            switch.append(time.perf_counter() - t)
        for _ in range(args.repeat):
            t = time.perf_counter()
            fresh = load_pipeline(args.model, args.device, dtype).pipe
            AdapterStack(fresh).set([StackEntry(a, 1.0), StackEntry(b, 0.7)])
            sync()
            reload.append(time.perf_counter() - t)
            del fresh
    ms = lambda xs: f"{statistics.median(xs) * 1000:9.1f} ms"  # noqa: E731
    print(f"model {args.model} ({family}) on {args.device}; 2 stacked LoRAs, {len(modules)} modules each, rank {args.rank}")
    print(f"first load of the base model        {first_load * 1000:9.1f} ms")
    print(f"change one adapter weight (median)  {ms(switch)}")
    print(f"reload base model + apply (median)  {ms(reload)}")
    print(f"ratio                               {statistics.median(reload) / statistics.median(switch):9.1f} x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
