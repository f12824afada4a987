"""The webUI name <-> module map, both directions, for SD1, SD2 and SDXL; every written key maps."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig

from test_adapters_util import LOCON_TARGETS, UNET_TARGETS, fresh_pipe, sd2_components


def _components(family):
    if family == "sd2":
        return sd2_components()
    p = fresh_pipe(family)
    return {k: v for k, v in {"unet": p.unet, "text_encoder": p.text_encoder,
                              "text_encoder_2": getattr(p, "text_encoder_2", None)}.items() if v is not None}


KNOWN = {
    "sd1": {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
            ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
            "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_out_0":
            ("unet", "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0"),
            "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_ff_net_0_proj":
            ("unet", "up_blocks.1.attentions.2.transformer_blocks.0.ff.net.0.proj"),
            "lora_unet_down_blocks_0_resnets_0_conv1": ("unet", "down_blocks.0.resnets.0.conv1"),
            "lora_unet_down_blocks_0_downsamplers_0_conv": ("unet", "down_blocks.0.downsamplers.0.conv"),
            "lora_unet_mid_block_attentions_0_proj_in": ("unet", "mid_block.attentions.0.proj_in"),
            "lora_te_text_model_encoder_layers_1_mlp_fc2": ("text_encoder", "encoder.layers.1.mlp.fc2")},
    "sd2": {"lora_te_text_model_encoder_layers_0_self_attn_q_proj":
            ("text_encoder", "encoder.layers.0.self_attn.q_proj"),
            "lora_unet_down_blocks_0_attentions_0_proj_in": ("unet", "down_blocks.0.attentions.0.proj_in")},
    "sdxl": {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q":
             ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
             "lora_unet_input_blocks_5_1_transformer_blocks_1_attn2_to_k":
             ("unet", "down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_k"),
             "lora_unet_middle_block_1_proj_in": ("unet", "mid_block.attentions.0.proj_in"),
             "lora_unet_output_blocks_0_1_proj_out": ("unet", "up_blocks.0.attentions.0.proj_out"),
             "lora_unet_input_blocks_1_0_in_layers_2": ("unet", "down_blocks.0.resnets.0.conv1"),
             "lora_unet_input_blocks_3_0_op": ("unet", "down_blocks.0.downsamplers.0.conv"),
             "lora_unet_output_blocks_2_2_conv": ("unet", "up_blocks.0.upsamplers.0.conv"),
             "lora_unet_middle_block_2_emb_layers_1": ("unet", "mid_block.resnets.1.time_emb_proj"),
             "lora_te1_text_model_encoder_layers_0_self_attn_q_proj":
             ("text_encoder", "encoder.layers.0.self_attn.q_proj"),
             "lora_te2_text_model_encoder_layers_9_self_attn_out_proj":
             ("text_encoder_2", "text_model.encoder.layers.9.self_attn.out_proj")},
}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_keymap_both_directions(family):
    from studio.adapters.keymap import build_keymap

    comps = _components(family)
    kmap = build_keymap(comps, family)
    for name, (comp, path) in KNOWN[family].items():
        assert kmap.to_module(name) == (comp, path)
        assert kmap.to_webui(comp, path) == name
    for name in kmap.names():
        comp, path = kmap.to_module(name)
        assert isinstance(comps[comp].get_submodule(path), (torch.nn.Linear, torch.nn.Conv2d))
        assert kmap.to_webui(comp, path) == name
    with pytest.raises(KeyError):
        kmap.to_module("lora_unet_no_such_block")
    with pytest.raises(KeyError):
        kmap.to_webui("unet", "nowhere.to_q")


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_every_written_key_maps_to_a_module(tmp_path, family):
    from studio.adapters import export_peft, load_adapter
    from studio.adapters.keymap import build_keymap

    comps = _components(family)
    targets = UNET_TARGETS + LOCON_TARGETS
    cfg = LoraConfig(r=2, lora_alpha=2, target_modules=targets, init_lora_weights=False)
    comps["unet"].add_adapter(cfg)
    for name in [c for c in comps if c != "unet"]:
        comps[name].add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "k_proj", "v_proj",
                                                                              "out_proj", "fc1", "fc2"]))
    path = export_peft(tmp_path / "x.safetensors", comps, family)
    f = load_adapter(path)
    assert f.family == family and len(f.modules) > 50
    kmap = build_keymap(comps, family)
    for name, module in f.modules.items():
        comp, mpath = kmap.to_module(name)
        layer = comps[comp].get_submodule(mpath)
        assert module.delta(layer.get_base_layer().weight).shape == layer.get_base_layer().weight.shape
    parts = f.parts()
    assert parts["unet"] > 0 and parts["te1"] > 0 and (parts["te2"] > 0) == (family == "sdxl")
