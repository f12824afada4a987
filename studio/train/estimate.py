"""Pre-flight estimate of VRAM and time for a config on the detected GPU, and the advice an
out-of-memory error turns into.

The numbers are a model, not a measurement: weights at their stored precision, the adapter with
its gradients and optimizer state, and activations that grow with batch x pixels (far less with
gradient checkpointing), calibrated on SD1.5 / SDXL runs in the ranges kohya users report.
``bench/train.py --device cuda`` measures the real figures per preset.
"""

from __future__ import annotations

from studio.train.config import TrainConfig, list_presets, load_preset

# parameter counts (millions) of the real models
PARAMS_M = {"sd1": {"unet": 860, "te": 123, "vae": 84}, "sd2": {"unet": 866, "te": 340, "vae": 84},
            "sdxl": {"unet": 2567, "te": 817, "vae": 84}}
# activation memory per image at the family's native resolution, in GB (fp16, with / without checkpointing)
ACT_GB = {"sd1": (0.35, 2.6), "sd2": (0.45, 3.2), "sdxl": (1.3, 9.0)}
NATIVE = {"sd1": 512, "sd2": 768, "sdxl": 1024}
# UNet forward TFLOPs per image at the native resolution
FWD_TFLOP = {"sd1": 0.4, "sd2": 0.9, "sdxl": 3.0}
# dense fp16 tensor TFLOPs of common cards (the rest: from the memory size)
GPU_TFLOPS = {"4090": 165, "4080": 97, "4070": 58, "4060": 30, "3090": 71, "3080": 59, "3070": 40, "3060": 25,
              "2080": 40, "2070": 30, "2060": 26, "a100": 312, "h100": 760, "h200": 760, "l4": 120, "t4": 65,
              "a10": 125, "v100": 112, "5090": 210, "5080": 113}


def _family_of(cfg: TrainConfig) -> str:
    spec = cfg.base_model.lower()
    if "xl" in spec:
        return "sdxl"
    try:
        from studio.models.family import base_family
        from studio.models.loader import detect_family

        return base_family(detect_family(cfg.base_model))
    except Exception:
        return "sd1"


def detect_gpu() -> dict:
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return {"name": props.name, "vram_gb": round(props.total_memory / 2**30, 1)}
    except Exception:
        pass
    return {"name": "cpu", "vram_gb": 0.0}


def _tflops(name: str, vram_gb: float) -> float:
    low = name.lower()
    for key, value in GPU_TFLOPS.items():
        if key in low:
            return value
    return 25.0 if vram_gb < 10 else 60.0


def estimate(cfg: TrainConfig, family: str | None = None, gpu: dict | None = None) -> dict:
    family = family or _family_of(cfg)
    gpu = gpu or detect_gpu()
    p = PARAMS_M[family]
    weight_bytes = 1 if cfg.fp8_base else (2 if cfg.mixed_precision != "no" else 4)
    gb = 1e6 / 2**30
    unet_w = p["unet"] * weight_bytes * gb
    frozen_resident = cfg.train_text_encoder or not (cfg.cache_text_encoder_outputs and cfg.offload_frozen)
    te_w = p["te"] * (2 if cfg.mixed_precision != "no" else 4) * gb if frozen_resident else 0.0
    vae_w = 0.0 if (cfg.cache_latents and cfg.offload_frozen) else p["vae"] * 4 * gb
    # adapter size: roughly rank x (in + out) over ~ 2 x 10^3 modules of width ~ 1e3 in SD1.5 scale
    adapter_m = cfg.rank * (2.5 if family != "sdxl" else 5.0) * (2.0 if cfg.method == "locon" else 1.0)
    adapter_m *= 1.3 if cfg.train_text_encoder else 1.0
    opt_bytes = {"adamw": 8, "adamw8bit": 2, "adafactor": 4, "prodigy": 16}[cfg.optimizer]
    adapter = adapter_m * (4 + 4 + opt_bytes) * gb / 10  # M-params -> GB (adapter_m is in 0.1 M)
    if cfg.method == "ti":  # only a few embedding rows train (the matrices' optimizer state is small)
        adapter = 0.05 * (2 if family == "sdxl" else 1)
    if cfg.method == "dreambooth":  # the UNet itself: fp32 weights + gradients + optimizer state (+ EMA)
        trained_m = p["unet"] + (p["te"] if cfg.train_text_encoder else 0)
        adapter = trained_m * (4 + 4 + opt_bytes + (4 if cfg.ema else 0)) * gb
        unet_w = 0.0
    scale = (cfg.resolution / NATIVE[family]) ** 2
    act = ACT_GB[family][0 if cfg.gradient_checkpointing else 1] * cfg.batch_size * scale
    if cfg.mixed_precision == "no":
        act *= 2
    overhead = 0.6  # CUDA context, allocator slack
    total = unet_w + te_w + vae_w + adapter + act + overhead
    tflop = FWD_TFLOP[family] * scale * cfg.batch_size * cfg.gradient_accumulation_steps
    tflop *= 3 + (1 if cfg.gradient_checkpointing else 0)
    tflops = _tflops(gpu["name"], gpu["vram_gb"]) * 0.35 if gpu["name"] != "cpu" else 0.3
    step_s = tflop / tflops
    return {
        "family": family, "gpu": gpu["name"], "gpu_vram_gb": gpu["vram_gb"],
        "vram_gb": round(total, 1),
        "parts_gb": {"unet": round(unet_w, 2), "text_encoders": round(te_w, 2), "vae": round(vae_w, 2),
                     "adapter_and_optimizer": round(adapter, 2), "activations": round(act, 2)},
        "fits": gpu["vram_gb"] == 0 or total <= gpu["vram_gb"] * 0.95,
        "seconds_per_step": round(step_s, 2),
        "total_minutes": round(step_s * cfg.max_train_steps / 60, 1),
    }


def lower_preset(cfg: TrainConfig, family: str | None = None) -> str | None:
    """The preset one step down in VRAM for this family (None at the bottom)."""
    family = family or _family_of(cfg)
    prefix = "sdxl" if family == "sdxl" else "sd15"
    presets = {n: load_preset(n) for n in list_presets() if n.startswith(prefix)}
    ladder = sorted((raw.get("vram_gb", 0), n) for n, raw in presets.items()
                    if raw.get("method", "lora") == cfg.method)  # (a LoRA run is not told to train an embedding)
    current = cfg.vram_gb or 1e9
    below = [n for v, n in ladder if v < current]
    return below[-1] if below else None


def oom_advice(cfg: TrainConfig, family: str | None = None) -> tuple[str, str]:
    """(message, fix) for a CUDA out-of-memory error: what to change, starting with the next preset down."""
    est = estimate(cfg, family)
    nxt = lower_preset(cfg, family)
    steps = []
    if nxt:
        steps.append(f"start from the preset '{nxt}' (--preset {nxt})")
    if cfg.batch_size > 1:
        steps.append(f"set batch_size to {max(1, cfg.batch_size // 2)} and raise gradient_accumulation_steps")
    if not cfg.gradient_checkpointing:
        steps.append("turn on gradient_checkpointing")
    if cfg.train_text_encoder:
        steps.append("set train_text_encoder to false")
    if not cfg.cache_latents:
        steps.append("turn on cache_latents")
    if cfg.resolution > 512:
        steps.append(f"lower resolution to {cfg.resolution - 256}")
    if not cfg.fp8_base and est["family"] == "sdxl":
        steps.append("turn on fp8_base")
    if not steps:
        steps.append("close other programs using the GPU; this is the smallest setting")
    msg = (f"The GPU ran out of memory (this config needs about {est['vram_gb']} GB; "
           f"{est['gpu']} has {est['gpu_vram_gb']} GB).")
    return msg, "; or ".join(steps) + "."
