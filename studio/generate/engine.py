"""Text-to-image, as the webUIs do it.

``txt2img`` works on a pipeline the caller already holds (the training engine's previews use it
with its own pipe, inside its own GPU job); it does not take the GPU gate. ``generate`` is the
whole studio path: it takes the gate, gets the base model from ``MODELS`` (never reloading it for
a change of adapters), applies the adapter stack the webUI way, generates, restores the base
weights exactly, and saves PNGs with A1111 ``parameters`` text.

Determinism: image ``i`` of a batch uses its own CPU generator seeded ``seed + i`` (as A1111
numbers them), so one seed gives the same picture alone or in a batch, on any device.
Cancelling (``cancel`` set) raises ``StudioError("Cancelled.")`` at the next step; nothing is
returned or saved for that call.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from studio.errors import StudioError

MAX_SEED = 2**32 - 1


def resolve_seed(seed: int | None) -> int:
    if seed is None or int(seed) < 0:
        return random.randint(0, MAX_SEED)
    return int(seed)


def _check_size(pipe, width, height) -> tuple[int, int]:
    scale = getattr(pipe, "vae_scale_factor", 8)
    default = pipe.unet.config.sample_size * scale
    width, height = int(width or default), int(height or default)
    multiple = scale * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    if width < multiple or height < multiple or width % 8 or height % 8:
        raise StudioError(f"Size {width}x{height} does not suit this model.",
                          f"Width and height must be multiples of 8 and at least {multiple}.")
    return width, height


def txt2img(pipe, prompt, negative="", steps=20, cfg=7.0, width=None, height=None, seed=0, sampler="Euler a",
            clip_skip=1, batch=1, callback=None, cancel=None, embeddings=None):
    """Generate ``batch`` images with an already-loaded SD / SDXL pipeline; returns PIL images.

    ``prompt`` may use the A1111 attention syntax; ``<lora:...>`` tags in it are ignored here
    (``generate`` resolves them). ``callback(step, total)`` is called after each step; ``cancel``
    (a threading.Event) stops at the next step with StudioError("Cancelled.").
    ``embeddings``: optional {token: vectors} of textual-inversion embeddings (see prompt.encode_prompt).
    The pipeline's scheduler is replaced for the call and put back after it.
    """
    import torch

    from studio.generate.prompt import encode_prompt, extract_network_tags, pad_to_same_length, pipe_family
    from studio.generate.samplers import make_scheduler

    if steps < 1 or batch < 1:
        raise StudioError(f"Steps and batch size must be at least 1 (got {steps} and {batch}).", "Raise them.")
    width, height = _check_size(pipe, width, height)
    seed = resolve_seed(seed)
    prompt, _, _ = extract_network_tags(prompt)
    negative, _, _ = extract_network_tags(negative or "")
    if cancel is not None and cancel.is_set():
        raise StudioError("Cancelled.")
    sdxl = pipe_family(pipe) == "sdxl"
    pos = encode_prompt(pipe, prompt, clip_skip, embeddings)
    if sdxl and not negative.strip():
        # A1111 and diffusers both use zeros for an empty SDXL negative prompt.
        neg_embeds, neg_pooled = torch.zeros_like(pos.embeds), torch.zeros_like(pos.pooled)
    else:
        neg = encode_prompt(pipe, negative, clip_skip, embeddings)
        neg_embeds, neg_pooled = neg.embeds, neg.pooled
    if pos.embeds.shape[1] != neg_embeds.shape[1]:
        empty = encode_prompt(pipe, "", clip_skip).embeds
        pos_embeds, neg_embeds = pad_to_same_length(pos.embeds, neg_embeds, empty, empty)
    else:
        pos_embeds = pos.embeds

    def on_step(_pipe, i, _t, kwargs):
        if cancel is not None and cancel.is_set():
            raise StudioError("Cancelled.")
        if callback is not None:
            callback(i + 1, steps)
        return kwargs

    dtype = pipe.unet.dtype
    kwargs = dict(prompt_embeds=pos_embeds.to(dtype), negative_prompt_embeds=neg_embeds.to(dtype),
                  num_inference_steps=steps, guidance_scale=cfg, width=width, height=height,
                  num_images_per_prompt=batch,
                  generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(batch)],
                  callback_on_step_end=on_step, output_type="pil")
    if sdxl:
        kwargs.update(pooled_prompt_embeds=pos.pooled.to(dtype), negative_pooled_prompt_embeds=neg_pooled.to(dtype))
    original = pipe.scheduler
    pipe.scheduler = make_scheduler(sampler, original.config)
    try:
        with torch.no_grad():
            images = pipe(**kwargs).images
    finally:
        pipe.scheduler = original
    return list(images)
