"""Tiny, randomly initialised SD1.x / SDXL pipelines, built offline in seconds.

They have the real architecture (same classes, same module names, same block layout with two
layers per block, the SDXL pair of text encoders of *different* widths) at a few MB, so every code
path the studio has (loading, adapters, training, merging, generation) runs on them on a CPU.
The tokenizer is a real CLIP BPE tokenizer with a small vocabulary learned here from a word list.

A single-file tiny model carries its own diffusers configs and tokenizer in the safetensors
metadata (``studio.configs``), because no shipped config matches its sizes; the loader
materialises them and goes through the same ``from_single_file(config=...)`` path real
checkpoints use.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

TINY_LABEL = "Tiny demo model (random weights, for trying the studio without a download)"
EMBEDDED_CONFIG_KEY = "studio.configs"

_WORDS = """a an the of in on at with and or photo picture painting drawing portrait style art
by sks ohwx man woman person dog cat car house tree sky sun city street forest mountain river
red green blue yellow black white orange purple pink brown gray golden silver
best quality masterpiece detailed high resolution realistic anime sketch oil watercolor
girl boy face smile hair eyes hat shirt dress standing sitting looking viewer outdoors indoors
day night light dark beautiful cute small large old young token trigger lora test""".split()


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_tokenizer(n_merges: int = 400):
    """A CLIPTokenizer with CLIP's byte alphabet and ``n_merges`` BPE merges learned from _WORDS."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars]
    words = Counter(tuple(w[:-1]) + (w[-1] + "</w>",) for w in _WORDS * 3)
    merges = []
    for _ in range(n_merges):
        pairs: Counter = Counter()
        for word, freq in words.items():
            for a, b in zip(word, word[1:]):
                pairs[(a, b)] += freq
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        merges.append((a, b))
        vocab_list.append(a + b)
        new_words: Counter = Counter()
        for word, freq in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_words[tuple(out)] += freq
        words = new_words
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _clip_config(hidden: int, layers: int, heads: int, vocab: int, projection: int | None = None, act="quick_gelu"):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                          num_attention_heads=heads, vocab_size=vocab, max_position_embeddings=77,
                          hidden_act=act, projection_dim=projection or hidden,
                          bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)


def build_tiny_pipeline(family: str = "sd1", seed: int = 0):
    """A randomly initialised StableDiffusionPipeline (sd1) or StableDiffusionXLPipeline (sdxl)."""
    import torch
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok = build_tokenizer()
    vocab = len(tok)
    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1,
                        norm_num_groups=32, sample_size=64)
    sched_kw = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                    steps_offset=1)
    if family == "sd1":
        te = CLIPTextModel(_clip_config(32, 2, 4, vocab))
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
        sched = PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=False, **sched_kw)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    elif family == "sdxl":
        # Different widths for the two encoders (32 and 64): with equal widths diffusers'
        # single-file loader cannot tell them apart and loads te1's weights into te2.
        # te2 has 10 layers so the key diffusers detects SDXL by (resblocks.9) exists.
        te1 = CLIPTextModel(_clip_config(32, 2, 4, vocab))
        te2 = CLIPTextModelWithProjection(_clip_config(64, 10, 4, vocab, projection=32, act="gelu"))
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2), cross_attention_dim=32 + 64, attention_head_dim=(2, 4),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=32)
        sched = EulerDiscreteScheduler(timestep_spacing="leading", **sched_kw)
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok,
                                         tokenizer_2=build_tokenizer(), unet=unet, scheduler=sched)
    else:
        from studio.errors import StudioError

        raise StudioError(f"Tiny models exist for sd1 and sdxl, not {family!r}.", "Use --family sd1 or --family sdxl.")
    return pipe


def embedded_configs(folder: Path) -> str:
    """JSON of every config / tokenizer file of a saved diffusers folder (no weights)."""
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix in (".json", ".txt") and "model_index" in p.name or (
                p.is_file() and p.parent.name in ("tokenizer", "tokenizer_2", "scheduler", "unet", "vae",
                                                  "text_encoder", "text_encoder_2") and p.suffix in (".json", ".txt")):
            files[p.relative_to(folder).as_posix()] = p.read_text(encoding="utf-8")
    return json.dumps(files, sort_keys=True)


def save_tiny_model(out: str | Path, family: str = "sd1", single_file: bool = False, seed: int = 0) -> Path:
    """Build a tiny pipeline and write it as a diffusers folder or a single-file webUI checkpoint."""
    import tempfile

    from studio.fileio import save_safetensors
    from studio.models.ldm import pipeline_to_ldm

    pipe = build_tiny_pipeline(family, seed=seed)
    out = Path(out)
    if not single_file:
        # Save to a sibling temp folder then rename, so a half-written model is never picked up.
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        pipe.save_pretrained(tmp, safe_serialization=True)
        if out.exists():
            import shutil

            shutil.rmtree(out)
        tmp.rename(out)
        return out
    if out.suffix != ".safetensors":
        out = out.with_suffix(".safetensors")
    with tempfile.TemporaryDirectory() as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        configs = embedded_configs(Path(tmp))
    state = pipeline_to_ldm(pipe, family, dtype=None)  # keep fp32: tests compare exact outputs
    arch = {"sd1": "stable-diffusion-v1", "sdxl": "stable-diffusion-xl-v1-base"}[family]
    meta = {EMBEDDED_CONFIG_KEY: configs, "modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": arch,
            "modelspec.implementation": "diffusers", "modelspec.title": f"tiny-{family}",
            "modelspec.description": TINY_LABEL, "modelspec.prediction_type": "epsilon"}
    return save_safetensors(out, state, meta)
