"""bench/merge: the studio's SVD merge vs a dense per-layer SVD merge, and bake vs a plain read + write.

    .venv/bin/python bench/merge.py [--rank 64] [--unet-only] [--keep DIR]

1. Builds three SD1.5-shaped LoRAs (the real module shapes of SD1.5's 192 UNet attention-block layers
   and 72 CLIP-L layers, random weights, ranks 32 / 32 / 16, fp16 files).
2. Merges them (weights 0.7 / -0.3 / 0.5) to rank 64 two ways, each in its own process:
   ``studio``: the factored SVD (QR of the stacked factors + SVD of the small core);
   ``dense``: what kohya's svd_merge does minus the clamp (dense delta + full SVD per layer).
   Prints the time, the process's peak RSS, and each method's relative error against the exact
   truncation (a float64 dense SVD), on a sample of modules (every 8th + the largest).
3. Writes an SD1.5-shaped fp16 checkpoint (random weights; UNet + CLIP-L + VAE, about 2.1 GB, or
   the UNet alone with --unet-only) and times ``bake`` of the three LoRAs into it against a plain
   ``safetensors`` load_file + save_file of the same checkpoint (each in its own process, peak RSS).
   The bake also hashes the output and fsyncs it (the plain write does neither).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WEIGHTS = (0.7, -0.3, 0.5)
RANKS = (32, 32, 16)


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ---- SD1.5 shapes --------------------------------------------------------------------------------

def sd15_lora_shapes() -> dict[str, tuple]:
    """webUI name -> weight shape for kohya's default SD1.5 targets (192 UNet + 72 text encoder)."""
    import torch
    from diffusers import UNet2DConditionModel

    from studio.adapters.keymap import to_webui_name

    cfg = json.loads((ROOT / "studio/models/configs/sd1/unet/config.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg)
    out = {}
    for path, m in unet.named_modules():
        if ".attentions." in path and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            out[to_webui_name("unet", path, "sd1")] = tuple(m.weight.shape)
    te = json.loads((ROOT / "studio/models/configs/sd1/text_encoder/config.json").read_text())
    d, ff = te["hidden_size"], te["intermediate_size"]
    for i in range(te["num_hidden_layers"]):
        for p in ("q", "k", "v", "out"):
            out[f"lora_te_text_model_encoder_layers_{i}_self_attn_{p}_proj"] = (d, d)
        out[f"lora_te_text_model_encoder_layers_{i}_mlp_fc1"] = (ff, d)
        out[f"lora_te_text_model_encoder_layers_{i}_mlp_fc2"] = (d, ff)
    return out


def make_loras(folder: Path) -> list[Path]:
    import torch

    from studio.adapters import save_adapter

    shapes = sd15_lora_shapes()
    paths = []
    for i, r in enumerate(RANKS):
        g = torch.Generator().manual_seed(i)
        mods = {}
        for name, shape in shapes.items():
            mods[name] = {"lora_down.weight": torch.randn(r, *shape[1:], generator=g) / math.sqrt(shape[1]),
                          "lora_up.weight": torch.randn(shape[0], r, *shape[2:], generator=g) * 0.01,
                          "alpha": torch.tensor(float(r) / 2)}
        paths.append(save_adapter(folder / f"lora{i}.safetensors", mods, "sd1"))
    return paths


def sd15_checkpoint_entries(unet_only: bool) -> list[tuple[str, str, tuple]]:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from studio.models import ldm

    cfgs = ROOT / "studio/models/configs/sd1"
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads((cfgs / "unet/config.json").read_text()))
        sd = ldm.unet_to_ldm(unet)
        if not unet_only:
            vae = AutoencoderKL.from_config(json.loads((cfgs / "vae/config.json").read_text()))
            sd.update(ldm.vae_to_ldm(vae.state_dict()))
            te = CLIPTextModel(CLIPTextConfig(**json.loads((cfgs / "text_encoder/config.json").read_text())))
            sd.update(ldm.clip_to_ldm(te.state_dict(), ldm.TE_PREFIXES[("sd1", 1)]))
    return [(k, "F16", tuple(v.shape)) for k, v in sorted(sd.items())]


def make_checkpoint(path: Path, unet_only: bool) -> Path:
    """A random fp16 SD1.5-shaped checkpoint, written streaming from a random pool (fast, low memory)."""
    import torch

    from studio.merge.stream import write_streaming

    entries = sd15_checkpoint_entries(unet_only)
    pool = (torch.randn(1 << 22, generator=torch.Generator().manual_seed(0)) * 0.02).half()

    shapes = {k: s for k, _, s in entries}

    def produce(key):
        n = math.prod(shapes[key])
        reps = -(-n // pool.numel())
        return (pool.repeat(reps)[:n] if reps > 1 else pool[:n]).reshape(shapes[key]).clone()

    return write_streaming(path, entries, produce, {"modelspec.title": "bench-sd15"})


# ---- workers (each in its own process so peak RSS is its own) ------------------------------------

def sample_names(names, shapes):
    big = max(names, key=lambda n: math.prod(shapes[n]))
    return sorted(set(names[::8]) | {big})


def worker_merge(method: str, folder: Path, rank: int) -> dict:
    import torch

    torch.set_grad_enabled(False)
    from studio.adapters import load_adapter
    from studio.merge import blend as bl

    paths = sorted(folder.glob("lora*.safetensors"))
    base_rss = peak_mb()
    t0 = time.perf_counter()
    files = [load_adapter(p) for p in paths]
    inputs = [bl.MergeInput(p, w) for p, w in zip(paths, WEIGHTS)]
    out = {}
    if method == "studio":
        modules, _ = bl.blend_modules(files, inputs, "svd", rank)
        for name, m in modules.items():
            out[name] = (m["lora_up.weight"].flatten(1), m["lora_down.weight"].flatten(1), float(m["alpha"]) / rank)
    else:  # dense per layer, as kohya's svd_merge_lora (without its 0.99-quantile clamp)
        for name in sorted(set().union(*[f.modules for f in files])):
            m = None
            for f, w in zip(files, WEIGHTS):
                mod = f.modules.get(name)
                if mod is None:
                    continue
                t = mod.tensors
                d = (t["lora_up.weight"].float().flatten(1) @ t["lora_down.weight"].float().flatten(1)) \
                    * (mod.alpha / mod.rank) * w
                m = d if m is None else m + d
            u, s, vh = torch.linalg.svd(m, full_matrices=False)
            out[name] = (u[:, :rank] * s[:rank], vh[:rank], 1.0)
    elapsed = time.perf_counter() - t0
    peak = peak_mb()
    # error against the exact truncation (float64 dense SVD of the exact float64 sum), sampled modules
    shapes = {n: (out[n][0].shape[0], out[n][1].shape[1]) for n in out}
    errs = []
    for name in sample_names(sorted(out), shapes):
        exact = None
        for f, w in zip(files, WEIGHTS):
            mod = f.modules.get(name)
            if mod is not None:
                t = mod.tensors
                d = (t["lora_up.weight"].double().flatten(1) @ t["lora_down.weight"].double().flatten(1)) \
                    * (mod.alpha / mod.rank) * w
                exact = d if exact is None else exact + d
        u, s, vh = torch.linalg.svd(exact, full_matrices=False)
        ref = (u[:, :rank] * s[:rank]) @ vh[:rank]
        up, down, scale = out[name]
        got = (up.double() @ down.double()) * scale
        errs.append(float((got - ref).norm() / ref.norm()))
    return {"seconds": elapsed, "peak_mb": peak, "import_mb": base_rss, "modules": len(out),
            "max_rel_err": max(errs), "sampled": len(errs)}


def worker_bake(kind: str, folder: Path) -> dict:
    import torch

    torch.set_grad_enabled(False)
    ckpt = folder / "ckpt.safetensors"
    base_rss = peak_mb()
    t0 = time.perf_counter()
    if kind == "plain":
        from safetensors.torch import load_file, save_file

        save_file(load_file(ckpt), str(folder / "plain_out.safetensors"))
    else:
        from studio.merge.bake import bake
        from studio.merge.blend import MergeInput

        paths = sorted(folder.glob("lora*.safetensors"))
        bake(ckpt, [MergeInput(p, w) for p, w in zip(paths, WEIGHTS)], folder / "baked.safetensors")
    return {"seconds": time.perf_counter() - t0, "peak_mb": peak_mb(), "import_mb": base_rss}


def run_worker(*args) -> dict:
    cmd = [sys.executable, __file__, "--worker", *map(str, args)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write(res.stderr)
        raise SystemExit(f"worker {args} failed")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--unet-only", action="store_true", help="bake bench on a UNet-only checkpoint (1.7 GB)")
    p.add_argument("--skip-bake", action="store_true")
    p.add_argument("--keep", help="work in this folder and keep the files")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        kind, *rest = args.worker
        if kind == "merge":
            print(json.dumps(worker_merge(rest[0], Path(rest[1]), int(rest[2]))))
        else:
            print(json.dumps(worker_bake(rest[0], Path(rest[1]))))
        return 0

    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-merge-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        if not list(folder.glob("lora*.safetensors")):
            make_loras(folder)
        print(f"three SD1.5-shaped LoRAs (ranks {RANKS}, 264 modules each) ready in {time.perf_counter() - t:.1f}s")
        print(f"\nSVD merge to rank {args.rank} (weights {WEIGHTS}); error = ||result - exact truncation|| / "
              "||exact truncation||, float64 reference")
        res = {m: run_worker("merge", m, folder, args.rank) for m in ("studio", "dense")}
        for m, r in res.items():
            print(f"  {m:7s} {r['seconds']:8.2f} s   peak RSS {r['peak_mb']:7.0f} MB (after imports "
                  f"{r['import_mb']:.0f} MB)   max rel err {r['max_rel_err']:.2e} on {r['sampled']} modules")
        print(f"  speed-up: {res['dense']['seconds'] / res['studio']['seconds']:.1f}x (target >= 20x)")
        if args.skip_bake:
            return 0
        ckpt = folder / "ckpt.safetensors"
        t = time.perf_counter()
        if not ckpt.exists():
            make_checkpoint(ckpt, args.unet_only)
        size = ckpt.stat().st_size / 1e9
        print(f"\nbake: SD1.5-shaped fp16 checkpoint ({'UNet only, ' if args.unet_only else ''}{size:.2f} GB) "
              f"ready in {time.perf_counter() - t:.1f}s")
        res = {k: run_worker("bake", k, folder) for k in ("plain", "bake")}
        for k, r in res.items():
            label = "safetensors load_file + save_file" if k == "plain" else "studio bake (3 LoRAs, streaming)"
            print(f"  {label:36s} {r['seconds']:7.2f} s   peak RSS {r['peak_mb']:7.0f} MB "
                  f"(after imports {r['import_mb']:.0f} MB)")
        print(f"  bake / plain time: {res['bake']['seconds'] / res['plain']['seconds']:.2f}x (target <= 2x)")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
