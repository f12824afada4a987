"""Helpers shared by the adapter tests (no tests here): tiny pipelines adapted with peft."""

from __future__ import annotations

import torch

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
LOCON_TARGETS = ["conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
TE_COMPONENTS = {"sd1": ["text_encoder"], "sd2": ["text_encoder"], "sdxl": ["text_encoder", "text_encoder_2"]}


def fresh_pipe(family: str, seed: int = 0):
    from studio.tiny import build_tiny_pipeline

    return build_tiny_pipeline(family, seed=seed)


def adapt(pipe, family: str, make_config, unet_targets=UNET_TARGETS, te=True) -> dict:
    """Add the adapter ``make_config(targets)`` to the UNet (and text encoders); return the models."""
    pipe.unet.add_adapter(make_config(unet_targets))
    models = {"unet": pipe.unet}
    if te:
        for name in TE_COMPONENTS[family]:
            getattr(pipe, name).add_adapter(make_config(TE_TARGETS))
            models[name] = getattr(pipe, name)
    return models


def unet_inputs(pipe, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cfg = pipe.unet.config
    x = torch.randn(1, cfg.in_channels, 8, 8, generator=g)
    ehs = torch.randn(1, 5, cfg.cross_attention_dim, generator=g)
    kw = {}
    if cfg.addition_embed_type == "text_time":
        n_text = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, n_text, generator=g),
                                   "time_ids": torch.randn(1, 6, generator=g)}
    return (x, torch.tensor([10]), ehs), kw


@torch.no_grad()
def outputs(pipe) -> dict[str, torch.Tensor]:
    """UNet and text-encoder outputs of ``pipe`` on fixed inputs."""
    args, kw = unet_inputs(pipe)
    out = {"unet": pipe.unet(*args, **kw).sample}
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    for name in ("text_encoder", "text_encoder_2"):
        te = getattr(pipe, name, None)
        if te is not None:
            out[name] = te(ids).last_hidden_state
    return out


def peft_layers(model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


@torch.no_grad()
def peft_merged_delta(layer) -> torch.Tensor:
    """W_merged - W for a peft layer, by really merging and unmerging it."""
    w = layer.get_base_layer().weight
    before = w.detach().clone()
    layer.merge()
    after = w.detach().clone()
    layer.unmerge()
    return after - before


def sd2_components(seed: int = 0) -> dict:
    """An SD2-shaped tiny UNet + open-clip-style CLIP text encoder (linear projections, gelu)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=32)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      vocab_size=100, max_position_embeddings=77, hidden_act="gelu"))
    return {"unet": unet, "text_encoder": te}
