"""LoHa / LoKr / DoRA / full: the registry's delta equals peft's merged weight change."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig

from test_adapters_util import (LOCON_TARGETS, UNET_TARGETS, adapt, fresh_pipe, outputs, peft_layers,
                                peft_merged_delta)

CONFIGS = {
    "loha": lambda t: LoHaConfig(r=3, alpha=5, target_modules=t, init_weights=False),
    "loha_tucker": lambda t: LoHaConfig(r=3, alpha=5, target_modules=t, init_weights=False, use_effective_conv2d=True),
    "lokr": lambda t: LoKrConfig(r=2, alpha=3, target_modules=t, init_weights=False),
    "lokr_full": lambda t: LoKrConfig(r=64, alpha=3, target_modules=t, init_weights=False),  # both factors full
    "lokr_tucker": lambda t: LoKrConfig(r=2, alpha=3, target_modules=t, init_weights=False,
                                        use_effective_conv2d=True, decompose_both=True),
    "dora": lambda t: LoraConfig(r=3, lora_alpha=6, target_modules=t, init_lora_weights=False, use_dora=True),
}
FILE_KIND = {"loha": "loha", "loha_tucker": "loha", "lokr": "lokr", "lokr_full": "lokr", "lokr_tucker": "lokr",
             "dora": "dora"}


def _perturb_dora_magnitudes(models):
    """peft initialises the magnitude to ||W||; move it so DoRA's own effect is tested too."""
    g = torch.Generator().manual_seed(1)
    for model in models.values():
        for layer in peft_layers(model).values():
            for mag in getattr(layer, "lora_magnitude_vector", {}).values():
                with torch.no_grad():
                    mag.weight.mul_(1 + 0.1 * torch.randn(mag.weight.shape, generator=g))


# every kind and variant on sd1; every kind on SDXL too (its two text encoders and SGM names)
CASES = [("sd1", c) for c in CONFIGS] + [("sdxl", c) for c in ("loha", "lokr", "dora")]


@pytest.mark.parametrize("family,cfg", CASES)
def test_delta_equals_peft_merge(tmp_path, family, cfg):
    from studio.adapters import export_peft, load_adapter
    from studio.adapters.keymap import build_keymap

    pipe = fresh_pipe(family)
    variant = cfg.endswith(("_tucker", "_full"))  # only the conv / factor shapes differ: UNet convs suffice
    unet_targets = LOCON_TARGETS if variant else UNET_TARGETS + LOCON_TARGETS
    models = adapt(pipe, family, CONFIGS[cfg], unet_targets=unet_targets, te=not variant)
    if cfg == "dora":
        _perturb_dora_magnitudes(models)
    path = export_peft(tmp_path / f"{cfg}.safetensors", models, family, dtype=torch.float32)
    f = load_adapter(path)
    assert f.kind == FILE_KIND[cfg] and f.family == family
    meta_args = json.loads(f.metadata["ss_network_args"])
    assert f.metadata["ss_network_module"] == "lycoris.kohya"
    assert meta_args["algo"] == {"dora": "lora"}.get(cfg, FILE_KIND[cfg])
    kmap = build_keymap(pipe, family)
    n = 0
    for comp, model in models.items():
        for path_, layer in peft_layers(model).items():
            name = kmap.to_webui(comp, path_)
            w = layer.get_base_layer().weight
            want = peft_merged_delta(layer)
            got = f.modules[name].delta(w)
            assert got.shape == w.shape and got.dtype == w.dtype
            assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (name, (got - want).abs().max())
            n += 1
    assert n == len(f.modules)
    if cfg == "loha_tucker":
        assert any("hada_t1" in m.shapes for m in f.modules.values())
    if cfg == "lokr_full":
        assert all(m.rank is None and m.alpha is None for m in f.modules.values())
    if cfg == "lokr_tucker":
        assert any("lokr_t2" in m.shapes for m in f.modules.values())
    if cfg == "dora":
        m = f.modules["lora_te1_text_model_encoder_layers_0_self_attn_q_proj" if family == "sdxl"
                      else "lora_te_text_model_encoder_layers_0_self_attn_q_proj"]
        assert m.kind == "dora" and m.shapes["dora_scale"][1:] == (1,)


def test_dora_input_axis_file_uses_a1111_math():
    """A ``dora_scale [1, in]`` file (LyCORIS default) normalises per input column, as A1111 does."""
    from studio.adapters.registry import AdapterModule, kind_for

    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 4, generator=g)
    t = {"lora_down.weight": torch.randn(2, 4, generator=g), "lora_up.weight": torch.randn(6, 2, generator=g),
         "alpha": torch.tensor(1.0), "dora_scale": torch.rand(1, 4, generator=g) + 0.5}
    mod = AdapterModule("lora_unet_x", kind_for(set(t)), {k: tuple(v.shape) for k, v in t.items()}, _tensors=t)
    merged = W + 0.5 * t["lora_up.weight"] @ t["lora_down.weight"]
    want = merged * (t["dora_scale"] / merged.norm(dim=0, keepdim=True)) - W
    assert torch.allclose(mod.delta(W), want, atol=1e-6)
    # and the output-axis layout is not the same thing
    t2 = dict(t, dora_scale=torch.rand(6, 1, generator=g) + 0.5)
    mod2 = AdapterModule("lora_unet_x", kind_for(set(t2)), {k: tuple(v.shape) for k, v in t2.items()}, _tensors=t2)
    want2 = merged * (t2["dora_scale"] / merged.norm(dim=1, keepdim=True)) - W
    assert torch.allclose(mod2.delta(W), want2, atol=1e-6)


def test_full_delta_file_reproduces_adapted_model(tmp_path):
    """A ``diff`` file made from merged weights, applied to a fresh model, gives the adapted outputs."""
    from studio.adapters import load_adapter, save_adapter
    from studio.adapters.keymap import build_keymap

    pipe = fresh_pipe("sd1")
    models = adapt(pipe, "sd1", CONFIGS["loha"], unet_targets=UNET_TARGETS)
    want = outputs(pipe)
    kmap = build_keymap(pipe, "sd1")
    modules = {kmap.to_webui(c, p): {"diff": peft_merged_delta(layer)}
               for c, m in models.items() for p, layer in peft_layers(m).items()}
    path = save_adapter(tmp_path / "full.safetensors", modules, "sd1", "full", dtype=torch.float32)
    f = load_adapter(path)
    assert f.kind == "full" and all(m.rank is None for m in f.modules.values())
    other = fresh_pipe("sd1")
    with torch.no_grad():
        for name, module in f.modules.items():
            comp, mpath = kmap.to_module(name)
            w = getattr(other, comp).get_submodule(mpath).weight
            w += module.delta(w)
    got = outputs(other)
    for part in want:
        assert torch.allclose(got[part], want[part], atol=1e-5, rtol=0), part
