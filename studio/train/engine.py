"""The training loop: one function, ``train(cfg, run_dir)``, readable top to bottom.

It follows diffusers' reference LoRA scripts (``train_text_to_image_lora[_sdxl].py``): latents +
noise at a random timestep via ``noise_scheduler.add_noise``, an epsilon or v-prediction target,
optional min-SNR-gamma weighting and noise offset, SDXL ``add_time_ids``; adapters are peft
configs injected into the UNet (and the text encoders when they train). Accelerate handles the
device, mixed precision and multi-process data parallelism; only the main process writes.

Methods: the peft adapters (lora, locon, loha, lokr, dora, dreambooth-lora) train adapter weights;
``ti`` trains new embedding rows (``studio.train.ti``); ``dreambooth`` trains the UNet itself (and
optionally the text encoders). The DreamBooth parts (instance / class prompts, class images, the
instance + prior loss, the single-file checkpoint) live in ``studio.train.dreambooth``.

Stop requests (SIGINT / SIGTERM via ``request_stop()``, or a ``cancel`` file in the run folder)
are honoured between steps: the checkpoint and the adapter so far are saved, then it returns.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import random
import time
from pathlib import Path

from studio.errors import StudioError
from studio.train.config import ADAPTER_METHODS, TrainConfig

CANCEL_FILE = "cancel"
EMA_FILE = "ema.pt"  # in a checkpoint folder: the EMA of the UNet (method dreambooth with ema)
UNET_ATTN_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
UNET_CONV_TARGETS = ["conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]

_STOP = {"requested": False}


def request_stop(*_args) -> None:
    """Signal handler / UI hook: finish the current step, save, exit cleanly."""
    _STOP["requested"] = True


def _record_unexpected(err: Exception, events) -> None:
    """Put an error nobody anticipated in the run's events, with the advice that still holds."""
    with contextlib.suppress(OSError):
        events.emit("error", message=f"{type(err).__name__}: {err}", fix="This is a bug or an unusual setup; "
                    "the run folder keeps its last checkpoint, so --resume can continue after a fix.")


# ---- pieces the loop uses ----------------------------------------------------------------

def peft_config(cfg: TrainConfig, component: str):
    """The peft config for ``cfg.method`` on ``component`` (unet / text encoder)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    conv = component == "unet" and (cfg.method == "locon" or cfg.conv_rank > 0)
    targets = (UNET_ATTN_TARGETS + (UNET_CONV_TARGETS if conv else [])) if component == "unet" else TE_TARGETS
    conv_rank = cfg.conv_rank or cfg.rank
    conv_alpha = cfg.conv_alpha or (cfg.alpha if not cfg.conv_rank else cfg.conv_rank * cfg.alpha / cfg.rank)
    patterns = {}
    if conv and (conv_rank != cfg.rank or conv_alpha != cfg.alpha):
        patterns = {t: conv_rank for t in UNET_CONV_TARGETS}
    alpha_patterns = {t: conv_alpha for t in UNET_CONV_TARGETS} if patterns else {}
    if cfg.method in ("lora", "locon", "dora", "dreambooth-lora"):
        return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=targets, lora_dropout=cfg.dropout,
                          use_dora=cfg.method == "dora", rank_pattern=patterns, alpha_pattern=alpha_patterns)
    if cfg.method == "loha":
        return LoHaConfig(r=cfg.rank, alpha=cfg.alpha, target_modules=targets, module_dropout=cfg.dropout,
                          rank_pattern=patterns, alpha_pattern=alpha_patterns)
    if cfg.method == "lokr":
        return LoKrConfig(r=cfg.rank, alpha=cfg.alpha, target_modules=targets, module_dropout=cfg.dropout,
                          rank_pattern=patterns, alpha_pattern=alpha_patterns)
    raise StudioError(f"Method {cfg.method!r} is not available in this version.", "Use lora, locon, loha, lokr or dora.")


def build_optimizer(cfg: TrainConfig, groups: list[dict]):
    import torch

    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise StudioError("Config key 'optimizer': adamw8bit needs bitsandbytes, which is not installed.",
                              "Install it (pip install bitsandbytes) or use optimizer adamw.") from err
        return bnb.optim.AdamW8bit(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=cfg.learning_rate, scale_parameter=False, relative_step=False,
                         warmup_init=False, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError as err:
            raise StudioError("Config key 'optimizer': prodigy needs prodigyopt, which is not installed.",
                              "Install it (pip install prodigyopt) or use optimizer adamw.") from err
        return Prodigy(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, safeguard_warmup=True,
                       use_bias_correction=True)
    raise StudioError(f"Unknown optimizer {cfg.optimizer!r}.", "Use adamw, adamw8bit, adafactor or prodigy.")


def build_lr_scheduler(cfg: TrainConfig, optimizer):
    import torch

    warm, total = cfg.lr_warmup_steps, cfg.max_train_steps
    kind = cfg.lr_scheduler

    def factor(step: int) -> float:  # multiplies each group's lr after `step` optimizer steps
        if warm and step < warm and kind != "constant":
            return (step + 1) / (warm + 1)
        if kind in ("constant", "constant_with_warmup"):
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(0.0, 1.0 - progress)  # linear

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def compute_snr(noise_scheduler, timesteps):
    """SNR per timestep (diffusers.training_utils.compute_snr)."""
    from diffusers.training_utils import compute_snr as _snr

    return _snr(noise_scheduler, timesteps)


def memory_stats(device) -> dict:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return {"vram_mb": round(torch.cuda.memory_allocated() / 2**20), "vram_peak_mb":
                round(torch.cuda.max_memory_allocated() / 2**20)}
    try:
        import resource

        return {"rss_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    except ImportError:  # pragma: no cover - Windows
        return {}


def export_adapter(out: Path, models: dict, family: str, metadata: dict, dtype) -> Path:
    from studio.train.export import export

    return export(out, models, family, metadata, dtype)


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def new_run_dir(cfg: TrainConfig) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir).expanduser()
    from studio.places import Settings, Workspace

    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Workspace(Settings.load().workspace_path()).runs / f"{cfg.output_name}-{stamp}"


# ---- the run -----------------------------------------------------------------------------

def train(cfg: TrainConfig, run_dir: str | os.PathLike | None = None, resume: bool = False,
          progress: bool = False) -> Path:
    """Run (or resume) training; returns the path of the adapter written."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list

    from studio.train import checkpoint as ckpt
    from studio.train import data
    from studio.train.events import EVENTS_FILE, EventWriter

    on_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    acc = Accelerator(cpu=on_cpu, mixed_precision="no" if on_cpu else cfg.mixed_precision,
                      step_scheduler_with_optimizer=False)
    main, world, rank, device = acc.is_main_process, acc.num_processes, acc.process_index, acc.device
    if run_dir is None:
        run_dir = broadcast_object_list([str(new_run_dir(cfg))])[0] if world > 1 else new_run_dir(cfg)
    run_dir = Path(run_dir)
    if main:
        if not resume and (run_dir / EVENTS_FILE).exists():
            raise StudioError(f"{run_dir} already holds a run.", "Resume it with --resume, or choose another output_dir.")
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.clean_leftovers(run_dir)
        from studio.fileio import atomic_write_json

        atomic_write_json(run_dir / "config.json", cfg.to_dict())
    acc.wait_for_everyone()
    events = EventWriter(run_dir / EVENTS_FILE, enabled=main)
    try:
        return _train(cfg, run_dir, resume, progress, acc, events, main, world, rank, device, torch, ckpt, data)
    except torch.cuda.OutOfMemoryError as err:
        from studio.train.estimate import oom_advice

        msg, fix = oom_advice(cfg)
        events.emit("error", message=msg, fix=fix)
        raise StudioError(msg, fix) from err
    except StudioError as err:
        events.emit("error", message=err.message, fix=err.fix)
        raise
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            _record_unexpected(err, events)
            raise
        msg = f"The disk is full ({err.filename or run_dir}): the run stopped."
        fix = ("Free some space (or move the workspace), then Resume: the last complete checkpoint is intact, "
               "and nothing half-written is left in the run folder.")
        with contextlib.suppress(OSError):  # on a full disk even this line may not fit
            events.emit("error", message=msg, fix=fix)
        raise StudioError(msg, fix) from err
    except Exception as err:
        _record_unexpected(err, events)
        raise
    finally:
        events.close()


def _train(cfg, run_dir, resume, progress, acc, events, main, world, rank, device, torch, ckpt, data) -> Path:
    from diffusers import DDPMScheduler
    from peft import inject_adapter_in_model

    from studio.models.family import base_family
    from studio.models.loader import load_pipeline
    from studio.train import dreambooth as db
    from studio.train import ti

    method = cfg.method
    uses_adapters = method in ADAPTER_METHODS or method == "dreambooth-lora"
    full_finetune = method == "dreambooth"
    unet_trains = cfg.train_unet and method != "ti"

    # -- 1. seeds, base model ------------------------------------------------------------
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    import numpy as np

    np.random.seed(cfg.seed % 2**32)
    started = time.time()
    loaded = load_pipeline(cfg.base_model, "cpu", torch.float32)
    pipe, family = loaded.pipe, loaded.family
    is_xl = base_family(family) == "sdxl"
    unet, vae = pipe.unet, pipe.vae
    text_encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if is_xl else [])
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if is_xl else [])
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction = cfg.prediction_type if cfg.prediction_type != "auto" else noise_scheduler.config.prediction_type
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(acc.mixed_precision, torch.float32)
    for m in [unet, vae, *text_encoders]:
        m.requires_grad_(False)
    new_rows = ti.add_tokens(cfg, tokenizers, text_encoders) if method == "ti" else []
    save_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[cfg.save_dtype]
    base_file = None  # the untouched base as one file, for extracting a LoRA from the fine-tune
    if full_finetune and cfg.extract_lora_rank and main:
        base_file = db.base_file_for_extraction(run_dir, pipe, family, loaded.source, save_dtype)

    # -- 2. data: entries, buckets, batch order ------------------------------------------
    entries, dataset = data.build_entries(cfg)
    if method.startswith("dreambooth"):
        for e in entries:
            e.caption = cfg.instance_prompt
    class_entries, class_pool, n_class = [], {}, 0
    if db.prior_preservation(cfg):
        with acc.main_process_first():
            paths, generated, folder = db.ensure_class_images(cfg, pipe, loaded.source, family, device, main)
        n_class = len(paths)
        class_pool = db.class_pool(paths, cfg, {e.bucket for e in entries}, len(entries))
        class_entries = [e for pool in class_pool.values() for e in pool]
        events.emit("info", message=f"class images: {len(paths)} in {folder} ({generated} generated, "
                    f"{len(paths) - generated} reused)", class_images_dir=str(folder),
                    class_images_generated=generated, class_images_reused=len(paths) - generated)
    order = data.BatchOrder(entries, cfg.batch_size, cfg.seed, world, rank)
    steps_per_epoch = order.steps_per_epoch(cfg.gradient_accumulation_steps)

    # -- 3. latent cache (VAE used once, then off the GPU) --------------------------------
    vae.to(device, dtype=torch.float32)
    latents = None
    if cfg.cache_latents:
        latents = data.LatentCache(vae, data.latent_cache_dir(), device)
        with acc.main_process_first():
            encoded = latents.fill(entries + class_entries)
        n_images = len(entries) + len(class_entries)
        events.emit("info", message=f"latents cached: {n_images} images, {encoded} encoded, "
                    f"{n_images - encoded} from the disk cache")
        if cfg.offload_frozen:
            vae.to("cpu")

    # -- 4. text encoders: trained (adapters, new TI rows, or whole), or frozen with cached outputs
    train_te = cfg.train_text_encoder or method == "ti"
    for te in text_encoders:
        te.to(device, dtype=torch.float32 if train_te else weight_dtype)
    if train_te:
        for te in text_encoders:
            if uses_adapters:
                inject_adapter_in_model(peft_config(cfg, "text_encoder"), te, adapter_name="default")
            elif full_finetune:
                te.requires_grad_(True)
            te.train()
    text_cache = None
    if not train_te and cfg.cache_text_encoder_outputs and not cfg.shuffle_tags:
        text_cache = data.TextCache()
        captions = [e.caption for e in entries + class_entries] + ([""] if cfg.caption_dropout else [])
        text_cache.fill(captions, lambda c: data.encode_prompts(text_encoders, tokenizers, c, cfg.clip_skip, device))
        if cfg.offload_frozen:
            for te in text_encoders:
                te.to("cpu")

    # -- 5. UNet + adapter ---------------------------------------------------------------
    unet.to(device, dtype=weight_dtype)
    if cfg.fp8_base:
        if device.type != "cuda" or not hasattr(torch, "float8_e4m3fn"):
            raise StudioError("Config key 'fp8_base' needs a CUDA GPU and a PyTorch with float8 support.",
                              "Set fp8_base to false.")
        unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=weight_dtype)
    if unet_trains and uses_adapters:
        inject_adapter_in_model(peft_config(cfg, "unet"), unet, adapter_name="default")
    elif unet_trains and full_finetune:
        unet.requires_grad_(True)
    for m in [unet, *(text_encoders if train_te else [])]:
        for p in m.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # adapter weights train in fp32 under mixed precision
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if train_te:
            for te in text_encoders:
                te.gradient_checkpointing_enable()
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())  # PyTorch SDPA
    unet.train()
    trained = {"unet": unet} if unet_trains else {}
    if train_te:
        trained.update({"text_encoder": text_encoders[0]} | ({"text_encoder_2": text_encoders[1]} if is_xl else {}))

    def trainable_state() -> dict:
        return {f"{name}.{k}": p for name, m in trained.items() for k, p in m.named_parameters() if p.requires_grad}

    def row_starts() -> dict[str, int]:
        """TI with AdamW: checkpoint only the new token rows (and their moments), not 49k-row matrices.
        Exact: masked gradients keep AdamW's moments of every other row at zero. Other optimizers
        (Adafactor's factored row statistics, say) keep their full state."""
        if not new_rows or cfg.optimizer != "adamw":
            return {}
        start = {id(r.weight): r.start for r in new_rows}
        return {k: start[id(p)] for k, p in trainable_state().items() if id(p) in start}

    groups = []
    if unet_trains:
        groups.append({"params": [p for p in unet.parameters() if p.requires_grad], "lr": cfg.unet_learning_rate})
    if train_te:
        groups.append({"params": [p for te in text_encoders for p in te.parameters() if p.requires_grad],
                       "lr": cfg.te_learning_rate})
    if cfg.optimizer == "adamw8bit" and (device.type != "cuda" or not _importable("bitsandbytes")):
        events.emit("warning", message="adamw8bit needs bitsandbytes and a CUDA GPU; using adamw instead")
        from dataclasses import replace

        cfg = replace(cfg, optimizer="adamw")
    optimizer = build_optimizer(cfg, groups)
    lr_scheduler = build_lr_scheduler(cfg, optimizer)
    names = list(trained)
    prepared = acc.prepare(*[trained[n] for n in names], optimizer)
    wrapped = dict(zip(names, prepared[:-1]))
    optimizer = prepared[-1]
    w_unet = wrapped.get("unet", unet)
    w_tes = [wrapped.get("text_encoder", text_encoders[0])] + (
        [wrapped.get("text_encoder_2", text_encoders[1])] if is_xl else [])
    ema = None
    if cfg.ema and unet_trains:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(unet.parameters(), decay=cfg.ema_decay)
        ema.to(device)

    # -- 6. RNGs and resume --------------------------------------------------------------
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)  # noise, timesteps (CPU: same on any device)
    cap_rng = random.Random(cfg.seed * 1000 + rank)  # caption dropout / tag shuffle
    step = 0
    if resume:
        last = ckpt.latest_checkpoint(run_dir)
        if last is None:
            raise StudioError(f"{run_dir} has no checkpoint to resume from.",
                              "Start the run again without --resume (or set save_every_n_steps).")
        state = ckpt.load_checkpoint(last)
        params = trainable_state()
        starts = state["state"].get("row_starts") or {}
        if starts:  # a Textual Inversion checkpoint holds only the trained rows
            state["optimizer"] = ckpt.expand_rows(state["trainable"], state["optimizer"], optimizer, params, starts)
        missing = (set(params) - set(starts)) ^ set(state["trainable"])
        if missing:
            raise StudioError(f"The checkpoint {last.name} does not match this config ({len(missing)} tensors differ).",
                              "Resume with the run's own config.json, without changing method, rank or targets.")
        with torch.no_grad():
            for k, p in params.items():
                if k not in starts:  # (row-sliced ones were restored by expand_rows)
                    p.copy_(state["trainable"][k])
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.load_state_dict(torch.load(last / EMA_FILE, map_location="cpu", weights_only=True))
            ema.to(device)
        if state["scaler"] is not None and acc.scaler is not None:
            acc.scaler.load_state_dict(state["scaler"])
        ckpt.restore_rng(state["rng"], state["state"]["rng"], gen, cap_rng)
        order.load_state(state["state"]["order"][rank] if world > 1 else state["state"]["order"])
        step = int(state["state"]["step"])
        events.emit("info", message=f"resumed from {last.name}", step=step)

    # -- 7. one training batch -> loss -----------------------------------------------------
    def caption_of(e) -> str:
        caption = data.process_caption(e.caption, cap_rng, cfg)
        return ti.expand(caption, cfg.token, cfg.num_vectors, prepend=True) if method == "ti" else caption

    def conditioning(batch_entries, tes, grad: bool):
        captions = [caption_of(e) for e in batch_entries]
        if text_cache is not None:
            hidden, pooled = text_cache.get(captions)
        else:
            with contextlib.nullcontext() if grad else torch.no_grad():
                hidden, pooled = data.encode_prompts(tes, tokenizers, captions, cfg.clip_skip, device)
        return hidden.to(device), None if pooled is None else pooled.to(device)

    def batch_latents(batch_entries):
        if latents is not None:
            lat, crops = latents.get(batch_entries)
            return lat.to(device), crops
        pix, crops = zip(*(data.image_to_pixels(e.path, e.bucket) for e in batch_entries))
        with torch.no_grad():
            dist = vae.encode(torch.stack(pix).to(device, dtype=vae.dtype)).latent_dist
        return (dist.mode() * vae.config.scaling_factor).float(), list(crops)

    def loss_on(batch_entries, model, tes, noise_gen, grad=True, prior=()):
        """(loss, parts): the weighted mean over the batch, or with DreamBooth class entries in
        ``prior`` (one forward for both) instance + prior_loss_weight * prior, each from its half."""
        n_instance = len(batch_entries)
        batch_entries = list(batch_entries) + list(prior)
        lat, crops = batch_latents(batch_entries)
        hidden, pooled = conditioning(batch_entries, tes, grad and train_te)
        b = lat.shape[0]
        noise = torch.randn(lat.shape, generator=noise_gen).to(device)
        if cfg.noise_offset:
            noise = noise + cfg.noise_offset * torch.randn((b, lat.shape[1], 1, 1), generator=noise_gen).to(device)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), generator=noise_gen).to(device)
        noisy = noise_scheduler.add_noise(lat, noise, t)
        target = noise if prediction == "epsilon" else noise_scheduler.get_velocity(lat, noise, t)
        extra = {}
        if is_xl:
            ids = [[e.size[1], e.size[0], c[0], c[1], e.bucket[1], e.bucket[0]] for e, c in zip(batch_entries, crops)]
            extra["added_cond_kwargs"] = {"text_embeds": pooled.to(weight_dtype),
                                          "time_ids": torch.tensor(ids, dtype=weight_dtype, device=device)}
        with acc.autocast():
            pred = model(noisy.to(weight_dtype), t, hidden.to(weight_dtype), **extra).sample
        loss = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=[1, 2, 3])
        if cfg.min_snr_gamma:
            snr = compute_snr(noise_scheduler, t)
            clipped = torch.clamp(snr, max=cfg.min_snr_gamma)
            loss = loss * (clipped / (snr + 1) if prediction == "v_prediction" else clipped / snr)
        if prior:
            total, instance, prior_term = db.split_loss(loss, n_instance, cfg.prior_loss_weight)
            return total, {"loss_instance": instance.item(), "loss_prior": prior_term.item()}
        weights = torch.tensor([e.weight for e in batch_entries], device=device)
        return (loss * weights).mean(), {}

    # A fixed evaluation batch (same images, noise and timesteps every time): its loss should fall.
    by_bucket: dict = {}
    for e in entries:
        by_bucket.setdefault(e.bucket, []).append(e)
    eval_entries = max(by_bucket.values(), key=len)[:4]

    def eval_loss() -> float:
        saved_state = cap_rng.getstate()
        with torch.no_grad():
            value = loss_on(eval_entries, acc.unwrap_model(w_unet), text_encoders,
                            torch.Generator().manual_seed(cfg.seed + 7919), grad=False)[0].item()
        cap_rng.setstate(saved_state)
        return value

    # -- 8. saving: checkpoints, samples, the adapter ------------------------------------
    metadata_base = _metadata(cfg, loaded, dataset, entries, steps_per_epoch, started, n_class)

    def save_adapter(path: Path, at_step: int) -> Path:
        """The run's result so far: an adapter, an embedding (ti) or a checkpoint (dreambooth)."""
        meta = dict(metadata_base, ss_steps=str(at_step), ss_epoch=str(at_step // steps_per_epoch + 1),
                    ss_training_finished_at=str(time.time()))
        if method == "ti":
            return ti.save(path, new_rows, family, cfg, at_step, loaded.source.name, save_dtype)
        if full_finetune:
            meta = {k: v for k, v in meta.items() if not k.startswith(("ss_network", "modelspec."))}
            with ema_weights():
                return db.save_checkpoint_file(path, pipe, family, loaded.source, save_dtype, meta)
        models = {n: acc.unwrap_model(m) for n, m in wrapped.items()}
        return export_adapter(path, models, family, meta, save_dtype)

    @contextlib.contextmanager
    def ema_weights():
        """Swap the EMA weights into the UNet for a save, then put the trained ones back."""
        if ema is None:
            yield
            return
        ema.store(unet.parameters())
        ema.copy_to(unet.parameters())
        try:
            yield
        finally:
            ema.restore(unet.parameters())

    def save_checkpoint(at_step: int) -> Path | None:
        rng_t, rng_js = ckpt.capture_rng(gen, cap_rng)
        orders = [order.state()]
        if world > 1:
            from accelerate.utils import gather_object

            orders = gather_object([order.state()])
        if not main:
            return None
        extra = {EMA_FILE: lambda p: torch.save(ema.state_dict(), p)} if ema is not None else None
        path = ckpt.save_checkpoint(run_dir, at_step, trainable_state(), optimizer, lr_scheduler, acc.scaler,
                                    rng_t, {"rng": rng_js, "order": orders if world > 1 else orders[0]},
                                    keep=cfg.keep_checkpoints, extra_files=extra, row_starts=row_starts())
        events.emit("checkpoint", step=at_step, path=str(path))
        return path

    def sample(at_step: int) -> None:
        if not main or not cfg.sample_prompts:
            return
        from studio.fileio import atomic_write

        from studio.train.export import txt2img

        rng_cpu = torch.get_rng_state()
        model = acc.unwrap_model(w_unet)
        model.eval()
        for m in [vae, *text_encoders]:
            m.to(device)
        paths = []
        for i, prompt in enumerate(cfg.sample_prompts):
            if method == "ti":  # the token's N vectors are N tokens
                prompt = ti.expand(prompt, cfg.token, cfg.num_vectors)
            image = txt2img(pipe, prompt, negative=cfg.sample_negative, steps=cfg.sample_steps, cfg=cfg.sample_cfg,
                            width=cfg.sample_width or cfg.resolution, height=cfg.sample_height or cfg.resolution,
                            seed=cfg.sample_seed + i, sampler=cfg.sample_sampler, clip_skip=cfg.clip_skip)
            out = run_dir / "samples" / f"step-{at_step:06d}-{i:02d}.png"
            paths.append(str(atomic_write(out, lambda tmp, im=image: im.save(tmp, format="PNG"))))
        if cfg.offload_frozen:
            if latents is not None:
                vae.to("cpu")
            if text_cache is not None:
                for te in text_encoders:
                    te.to("cpu")
        model.train()
        torch.set_rng_state(rng_cpu)
        events.emit("sample", step=at_step, paths=paths, prompts=list(cfg.sample_prompts))

    # -- 9. the loop -------------------------------------------------------------------------
    output = run_dir / f"{cfg.token if method == 'ti' else cfg.output_name}.safetensors"
    start_step = step
    first_eval = eval_loss() if main else None
    events.emit("start", step=step, max_train_steps=cfg.max_train_steps, family=family, method=cfg.method,
                device=str(device), processes=world, mixed_precision=acc.mixed_precision, prediction=prediction,
                images=len(entries), steps_per_epoch=steps_per_epoch, eval_loss=first_eval, resumed=resume,
                run_dir=str(run_dir), config=cfg.to_dict())
    bar = None
    if progress and main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_train_steps, initial=step, unit="step", dynamic_ncols=True)
    t_last, n_last, t_start = time.perf_counter(), step, time.perf_counter()
    cancelled = False
    while step < cfg.max_train_steps:
        # one optimizer step = gradient_accumulation_steps micro-batches (per process)
        total, parts = 0.0, {}
        for micro in range(cfg.gradient_accumulation_steps):
            batch = [entries[i] for i in order.next()]
            prior = db.class_batch(class_pool, batch[0].bucket, len(batch), cfg.seed, step, micro, rank) \
                if class_pool else ()
            last = micro == cfg.gradient_accumulation_steps - 1
            with contextlib.nullcontext() if last else acc.no_sync(w_unet):
                loss, got = loss_on(batch, w_unet, w_tes, gen, prior=prior)
                loss = loss / cfg.gradient_accumulation_steps
                acc.backward(loss)
            total += loss.detach().item()
            for k, v in got.items():
                parts[k] = parts.get(k, 0.0) + v / cfg.gradient_accumulation_steps
        for rows in new_rows:  # TI: only the new rows' gradients count
            rows.mask_gradient()
        if cfg.max_grad_norm:
            acc.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.max_grad_norm)
        optimizer.step()
        for rows in new_rows:  # TI: undo the weight decay on every other row
            rows.restore()
        if ema is not None:
            ema.step(unet.parameters())
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        now = time.perf_counter()
        it_s = (step - n_last) / max(now - t_last, 1e-9)
        t_last, n_last = now, step
        events.emit("step", step=step, epoch=order.epoch, loss=round(total, 6), **{k: round(v, 6) for k, v in parts.items()},
                    lr=float(optimizer.param_groups[0]["lr"]), it_per_s=round(it_s, 3), **memory_stats(device))
        if bar is not None:
            bar.set_postfix(loss=f"{total:.4f}", refresh=False)
            bar.update(1)

        stop = _STOP["requested"] or (run_dir / CANCEL_FILE).exists()
        if world > 1:
            flag = acc.reduce(torch.tensor([float(stop)], device=device), reduction="sum")
            stop = bool(flag.item() > 0)
        if cfg.sample_every_n_steps and step % cfg.sample_every_n_steps == 0:
            sample(step)
        if stop and step < cfg.max_train_steps:
            save_checkpoint(step)
            if main:
                save_adapter(output, step)
            cancelled = True
            break
        if cfg.save_every_n_steps and step % cfg.save_every_n_steps == 0 and step < cfg.max_train_steps:
            save_checkpoint(step)
    if bar is not None:
        bar.close()

    # -- 10. the result --------------------------------------------------------------------
    acc.wait_for_everyone()
    if not cancelled:
        if main:
            save_adapter(output, step)
            if base_file is not None:
                lora = db.extract_lora(output, base_file, run_dir / f"{cfg.output_name}-lora.safetensors",
                                       cfg.extract_lora_rank, save_dtype)
                events.emit("info", message=f"extracted a rank-{cfg.extract_lora_rank} LoRA: {lora.name}",
                            lora=str(lora))
                _publish(lora, run_dir, "lora")
                if base_file.parent == run_dir:  # our own copy of the base, only needed for this
                    base_file.unlink()
        if cfg.save_every_n_steps:
            save_checkpoint(step)  # every process joins (the data positions are gathered)
    final_eval = eval_loss() if main else None
    elapsed = time.perf_counter() - t_start
    published = _publish(output, run_dir, cfg.method) if main else None
    events.emit("done", step=step, output=str(output), cancelled=cancelled, eval_loss=final_eval,
                published=str(published) if published else None,
                it_per_s=round((step - start_step) / max(elapsed, 1e-9), 3), **memory_stats(device))
    acc.wait_for_everyone()
    acc.end_training()
    return output


def _publish(output: Path, run_dir: Path, method: str) -> Path | None:
    """Link the result into the workspace's outputs folder, for runs that live in the workspace."""
    from studio.places import Settings, Workspace
    from studio.train.publish import publish

    workspace = Workspace(Settings.load().workspace_path())
    if not output.exists() or workspace.runs.resolve() not in run_dir.resolve().parents:
        return None
    return publish(output, workspace.ensure(), method, run_dir.name)


def _metadata(cfg: TrainConfig, loaded, dataset, entries, steps_per_epoch: int, started: float,
              n_class_images: int = 0) -> dict:
    """kohya ``ss_*`` training metadata plus ``modelspec.*`` (all values strings)."""
    from studio.models.family import base_family
    from studio.train.export import dataset_dirs, model_hashes, tag_frequency

    family = loaded.family
    base = base_family(family)
    legacy, full = model_hashes(loaded.source)
    n_reg = sum(1 for e in entries if e.weight != 1.0 or False) + n_class_images
    lora_like = cfg.method in ("lora", "locon", "dora", "dreambooth-lora", "dreambooth", "ti")
    module = "networks.lora" if lora_like else "lycoris.kohya"
    net_args = {"algo": {"locon": "locon", "loha": "loha", "lokr": "lokr"}.get(cfg.method, "lora")}
    if cfg.method == "locon" or cfg.conv_rank:
        net_args.update(conv_dim=str(cfg.conv_rank or cfg.rank), conv_alpha=str(cfg.conv_alpha or cfg.alpha))
    if cfg.method == "dora":
        net_args["dora_wd"] = "True"
    arch = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sdxl": "stable-diffusion-xl-v1-base"}[base]
    if family == "sd2-v":
        arch = "stable-diffusion-v2-768-v"
    prediction = cfg.prediction_type if cfg.prediction_type != "auto" else (
        "v_prediction" if family == "sd2-v" else "epsilon")
    res = f"({cfg.resolution}, {cfg.resolution})"
    return {
        "ss_session_id": str(random.Random(started).randint(0, 2**31)),
        "ss_training_started_at": str(started),
        "ss_output_name": cfg.output_name,
        "ss_learning_rate": str(cfg.learning_rate),
        "ss_unet_lr": str(cfg.unet_learning_rate),
        "ss_text_encoder_lr": str(cfg.te_learning_rate if cfg.train_text_encoder else 0.0),
        "ss_num_train_images": str(sum(e.repeats for e in entries if e.weight == 1.0)),
        "ss_num_reg_images": str(n_reg),
        "ss_num_batches_per_epoch": str(steps_per_epoch),
        "ss_num_epochs": str(math.ceil(cfg.max_train_steps / steps_per_epoch)),
        "ss_max_train_steps": str(cfg.max_train_steps),
        "ss_batch_size_per_device": str(cfg.batch_size),
        "ss_gradient_accumulation_steps": str(cfg.gradient_accumulation_steps),
        "ss_lr_warmup_steps": str(cfg.lr_warmup_steps),
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_optimizer": {"adamw": "torch.optim.AdamW", "adamw8bit": "bitsandbytes.optim.AdamW8bit",
                         "adafactor": "transformers.optimization.Adafactor",
                         "prodigy": "prodigyopt.Prodigy"}[cfg.optimizer] + f"(weight_decay={cfg.weight_decay})",
        "ss_max_grad_norm": str(cfg.max_grad_norm),
        "ss_network_module": module,
        "ss_network_dim": str(cfg.rank),
        "ss_network_alpha": str(cfg.alpha),
        "ss_network_dropout": str(cfg.dropout),
        "ss_network_args": json.dumps(net_args),
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_full_fp16": "False",
        "ss_v2": str(base == "sd2"),
        "ss_v_parameterization": str(prediction == "v_prediction"),
        "ss_base_model_version": {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}[base],
        "ss_sd_model_name": loaded.source.name,
        "ss_sd_model_hash": legacy,
        "ss_new_sd_model_hash": full,
        "ss_resolution": res,
        "ss_enable_bucket": str(cfg.enable_buckets),
        "ss_min_bucket_reso": str(min(cfg.min_bucket_side, cfg.resolution)),
        "ss_max_bucket_reso": str(cfg.max_bucket_side or cfg.resolution * 2),
        "ss_bucket_info": json.dumps({"buckets": {f"{w}x{h}": sum(e.repeats for e in entries if e.bucket == (w, h))
                                                  for w, h in sorted({e.bucket for e in entries})}}),
        "ss_seed": str(cfg.seed),
        "ss_clip_skip": str(cfg.clip_skip),
        "ss_keep_tokens": str(cfg.keep_tokens),
        "ss_shuffle_caption": str(cfg.shuffle_tags),
        "ss_caption_dropout_rate": str(cfg.caption_dropout),
        "ss_noise_offset": str(cfg.noise_offset),
        "ss_min_snr_gamma": str(cfg.min_snr_gamma),
        "ss_prior_loss_weight": str(cfg.prior_loss_weight),
        "ss_gradient_checkpointing": str(cfg.gradient_checkpointing),
        "ss_cache_latents": str(cfg.cache_latents),
        "ss_training_comment": "trained with Adapter Studio",
        "ss_tag_frequency": json.dumps(tag_frequency(dataset)),
        "ss_dataset_dirs": json.dumps(dataset_dirs(dataset)),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": arch if cfg.method == "dreambooth" else f"{arch}/lora" if lora_like
        else f"{arch}/lycoris",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if base == "sdxl"
        else "diffusers",
        "modelspec.title": cfg.output_name,
        "modelspec.resolution": f"{cfg.resolution}x{cfg.resolution}",
        "modelspec.prediction_type": "v" if prediction == "v_prediction" else "epsilon",
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
    }
