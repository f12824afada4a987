"""Training throughput: the studio trainer vs a bare loop, and cached vs uncached.

    .venv/bin/python bench/train.py                 # CPU, a small-but-not-trivial SD1-shaped model
    .venv/bin/python bench/train.py --device cuda   # real-shaped SD1.5 / SDXL UNets, per preset

CPU mode builds one model (UNet 64/128 channels, 64 px images -> 32x32 latents) and reports
steady-state steps/s (first steps skipped) of:
  - bare:     the same UNet + peft LoRA forward, backward, AdamW step on pre-made latents and
              text embeddings; no framework, no events, no data order;
  - studio:   ``studio.train.engine.train`` with latent + text-encoder caching;
  - uncached: the studio trainer encoding every batch with the VAE and text encoder.
CUDA mode builds real-shaped SD1.5 and SDXL UNets with random weights and, for each preset,
prints it/s and peak VRAM of the UNet training step at the preset's batch / resolution /
precision / checkpointing (text encoders and VAE cached, as the presets do).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_model(folder: Path) -> Path:
    import torch
    from diffusers import UNet2DConditionModel

    from studio.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline("sd1")
    torch.manual_seed(0)
    pipe.unet = UNet2DConditionModel(
        block_out_channels=(64, 128), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_dataset(folder: Path, n: int = 8) -> Path:
    import numpy as np
    from PIL import Image

    sub = folder / "1_bench"
    sub.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray((rng.random((64, 64, 3)) * 255).astype("uint8")).save(sub / f"{i}.png")
        (sub / f"{i}.txt").write_text(f"bench, image {i}")
    return folder


def steady_rate(run: Path, skip: int) -> float:
    from studio.train.events import read_events

    times = [e["time"] for e in read_events(run / "events.jsonl") if e["type"] == "step"][skip:]
    return (len(times) - 1) / max(times[-1] - times[0], 1e-9)


def bare_loop(model: Path, cfg, steps: int, skip: int) -> float:
    """The same UNet + peft LoRA, forward / backward / AdamW step, nothing else."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import inject_adapter_in_model

    from studio.train.engine import peft_config

    unet = UNet2DConditionModel.from_pretrained(model / "unet")
    unet.requires_grad_(False)
    inject_adapter_in_model(peft_config(cfg, "unet"), unet)
    unet.train()
    sched = DDPMScheduler.from_pretrained(model / "scheduler")
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(cfg.batch_size, 4, cfg.resolution // 2, cfg.resolution // 2, generator=g)
    hidden = torch.randn(cfg.batch_size, 77, 32, generator=g)
    stamps = []
    for _ in range(steps):
        noise = torch.randn(lat.shape, generator=g)
        t = torch.randint(0, 1000, (lat.shape[0],), generator=g)
        pred = unet(sched.add_noise(lat, noise, t), t, hidden).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        stamps.append(time.perf_counter())
    stamps = stamps[skip:]
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def cpu_bench(steps: int, skip: int) -> None:
    import torch

    from studio.train.config import resolve_config
    from studio.train.engine import train

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ.setdefault("STUDIO_CACHE_DIR", str(tmp / "cache"))
        model = build_model(tmp / "model")
        ds = build_dataset(tmp / "ds")
        base = dict(base_model=str(model), dataset=str(ds), max_train_steps=steps, resolution=64, min_bucket_side=32,
                    bucket_step=32, rank=8, alpha=8, learning_rate=1e-4, batch_size=2, device="cpu",
                    gradient_checkpointing=False, save_dtype="fp32")
        results = {}
        cfg = resolve_config(dict(base, output_dir=str(tmp / "studio")))
        results["bare"] = bare_loop(model, cfg, steps, skip)
        train(cfg)
        results["studio (cached)"] = steady_rate(tmp / "studio", skip)
        train(resolve_config(dict(base, output_dir=str(tmp / "uncached"), cache_latents=False,
                                  cache_text_encoder_outputs=False)))
        results["studio (uncached)"] = steady_rate(tmp / "uncached", skip)
    print(f"model: SD1-shaped UNet 64/128 ch, 64 px images (32x32 latents), batch 2, LoRA rank 8, CPU, "
          f"{torch.get_num_threads()} thread(s), {steps} steps, first {skip} skipped")
    for name, rate in results.items():
        print(f"  {name:18s} {rate:7.2f} steps/s")
    overhead = results["bare"] / results["studio (cached)"] - 1
    print(f"  trainer overhead vs bare loop: {overhead * 100:+.1f}%  (target <= 10%)")
    print(f"  cached vs uncached: {results['studio (cached)'] / results['studio (uncached)']:.2f}x")


def cuda_bench(steps: int, skip: int) -> None:
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import inject_adapter_in_model

    from studio.train.config import list_presets, resolve_config
    from studio.train.engine import peft_config

    configs = ROOT / "studio" / "models" / "configs"
    for name in list_presets():
        family = "sdxl" if name.startswith("sdxl") else "sd1"
        cfg = resolve_config({}, name, need_inputs=False)
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)
        unet_cfg = json.loads((configs / family / "unet" / "config.json").read_text())
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        with torch.device("cuda"):
            unet = UNet2DConditionModel.from_config(unet_cfg).to(dtype)
        unet.requires_grad_(False)
        if cfg.fp8_base:
            unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype)
        inject_adapter_in_model(peft_config(cfg, "unet"), unet)
        params = [p for p in unet.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        opt = torch.optim.AdamW(params, lr=1e-4)
        sched = DDPMScheduler(num_train_timesteps=1000)
        b, s = cfg.batch_size, cfg.resolution // 8
        lat = torch.randn(b, 4, s, s, device="cuda")
        hidden = torch.randn(b, 77, unet_cfg["cross_attention_dim"], device="cuda", dtype=dtype)
        extra = {}
        if family == "sdxl":
            extra["added_cond_kwargs"] = {"text_embeds": torch.randn(b, 1280, device="cuda", dtype=dtype),
                                          "time_ids": torch.tensor([[cfg.resolution] * 2 + [0, 0] + [cfg.resolution] * 2] * b,
                                                                   device="cuda", dtype=dtype)}
        scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
        stamps = []
        try:
            for _ in range(steps):
                for _micro in range(cfg.gradient_accumulation_steps):
                    noise = torch.randn_like(lat)
                    t = torch.randint(0, 1000, (b,), device="cuda")
                    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                        pred = unet(sched.add_noise(lat, noise, t).to(dtype), t, hidden, **extra).sample
                    loss = torch.nn.functional.mse_loss(pred.float(), noise) / cfg.gradient_accumulation_steps
                    scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
                stamps.append(time.perf_counter())
            st = stamps[skip:]
            rate = (len(st) - 1) / (st[-1] - st[0])
            print(f"  {name:16s} {rate:6.2f} it/s  peak VRAM {torch.cuda.max_memory_allocated() / 2**30:5.1f} GB "
                  f"(preset target {cfg.vram_gb:g} GB; batch {b} x accum {cfg.gradient_accumulation_steps}, "
                  f"{cfg.resolution}px, {cfg.mixed_precision}, ckpt {cfg.gradient_checkpointing}, fp8 {cfg.fp8_base})")
        except torch.cuda.OutOfMemoryError:
            print(f"  {name:16s} out of memory")
        del unet, opt, params
        torch.cuda.empty_cache()


def main() -> None:
    from studio.quiet import quiet_libraries

    quiet_libraries()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.device == "cuda":
        cuda_bench(args.steps or 12, 3)
    else:
        cpu_bench(args.steps or 30, 5)


if __name__ == "__main__":
    main()
