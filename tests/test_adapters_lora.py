"""LoRA / LoCon: written from peft-adapted tiny models, loaded back by diffusers, names mapped."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig

from test_adapters_util import (LOCON_TARGETS, UNET_TARGETS, adapt, fresh_pipe, outputs, peft_layers,
                                peft_merged_delta)


def lora_config(r=4, alpha=2.0):
    return lambda targets: LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("kind", ["lora", "locon"])
def test_diffusers_loads_export_and_outputs_match(tmp_path, family, kind):
    from studio.adapters import export_peft, load_adapter
    from studio.fileio import sshs_hashes

    pipe = fresh_pipe(family)
    base_out = outputs(pipe)
    targets = UNET_TARGETS + (LOCON_TARGETS if kind == "locon" else [])
    models = adapt(pipe, family, lora_config(), unet_targets=targets)
    n_layers = sum(len(peft_layers(m)) for m in models.values())
    want = outputs(pipe)
    assert (want["unet"] - base_out["unet"]).abs().max() > 1e-3  # the adapter does something
    assert (want["text_encoder"] - base_out["text_encoder"]).abs().max() > 1e-3

    path = export_peft(tmp_path / f"{kind}.safetensors", models, family, metadata={"ss_steps": 10},
                       dtype=torch.float32)
    f = load_adapter(path)
    assert (f.kind, f.family, f.format) == (kind, family, "kohya")
    assert len(f.modules) == n_layers
    assert f.metadata["ss_steps"] == "10"
    assert f.metadata["sshs_model_hash"] == sshs_hashes(path)[0]
    assert f.metadata["sshs_legacy_hash"] == sshs_hashes(path)[1]
    assert f.metadata["ss_base_model_version"] == {"sd1": "sd_v1", "sdxl": "sdxl_base_v1-0"}[family]
    if kind == "locon":
        assert json.loads(f.metadata["ss_network_args"])["conv_dim"] == "4"
    if family == "sdxl":
        assert any(n.startswith("lora_unet_input_blocks_4_1_") for n in f.modules)
        assert f.parts()["te2"] > 0

    other = fresh_pipe(family)
    other.load_lora_weights(str(path))
    loaded = sum(len(peft_layers(getattr(other, c))) for c in models)
    assert loaded == n_layers  # every module of the file became a LoRA layer: no key left unloaded
    got = outputs(other)
    for part in want:
        assert torch.allclose(got[part], want[part], atol=1e-5, rtol=0), part


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_lora_and_locon_delta_equals_peft(family):
    from studio.adapters.writer import peft_to_webui
    from studio.adapters.registry import AdapterModule, kind_for

    pipe = fresh_pipe(family)
    models = adapt(pipe, family, lora_config(r=3, alpha=5.0), unet_targets=UNET_TARGETS + LOCON_TARGETS, te=False)
    tensors = peft_to_webui(models, family)
    from studio.adapters.keymap import build_keymap

    kmap = build_keymap(pipe, family)
    convs = 0
    for name, t in tensors.items():
        comp, path = kmap.to_module(name)
        layer = getattr(pipe, comp).get_submodule(path)
        mod = AdapterModule(name, kind_for(set(t)), {k: tuple(v.shape) for k, v in t.items()}, _tensors=t)
        w = layer.get_base_layer().weight
        convs += w.ndim == 4 and w.shape[2] == 3
        assert torch.allclose(mod.delta(w), peft_merged_delta(layer), atol=1e-5, rtol=0), name
    assert convs > 0


def test_default_write_is_fp16_with_float_alpha(tmp_path):
    from studio.adapters import export_peft, load_adapter
    from studio.fileio import read_safetensors_header

    pipe = fresh_pipe("sd1")
    models = adapt(pipe, "sd1", lora_config(r=4, alpha=3.0), te=False)
    path = export_peft(tmp_path / "a.safetensors", models, "sd1")
    h = read_safetensors_header(path)
    assert {v["dtype"] for k, v in h.tensors.items() if not k.endswith(".alpha")} == {"F16"}
    assert {v["dtype"] for k, v in h.tensors.items() if k.endswith(".alpha")} == {"F32"}
    f = load_adapter(path)
    assert f.dtype == "float16"
    m = next(iter(f.modules.values()))
    assert (m.rank, m.alpha) == (4, 3.0)
    for key in ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_v2",
                "ss_base_model_version", "modelspec.sai_model_spec", "modelspec.architecture",
                "modelspec.title", "modelspec.date", "modelspec.resolution"):
        assert key in h.metadata, key
    assert (h.metadata["ss_network_dim"], h.metadata["ss_network_alpha"], h.metadata["ss_v2"]) == ("4", "3", "False")
    assert h.metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert not any(k.endswith(".scale") for k in h.tensors)


def test_tucker_lora_mid_matches_conv_composition():
    """lora_mid (LoCon Tucker): dW applied as one conv equals down(1x1) -> mid(kxk) -> up(1x1)."""
    from studio.adapters.registry import AdapterModule, kind_for

    g = torch.Generator().manual_seed(0)
    down, mid, up = (torch.randn(3, 6, 1, 1, generator=g), torch.randn(3, 3, 3, 3, generator=g),
                     torch.randn(5, 3, 1, 1, generator=g))
    t = {"lora_down.weight": down, "lora_mid.weight": mid, "lora_up.weight": up, "alpha": torch.tensor(1.5)}
    mod = AdapterModule("lora_unet_x", kind_for(set(t)), {k: tuple(v.shape) for k, v in t.items()}, _tensors=t)
    dw = mod.delta(torch.zeros(5, 6, 3, 3))
    x = torch.randn(1, 6, 7, 7, generator=g)
    F = torch.nn.functional
    want = F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up) * (1.5 / 3)
    assert torch.allclose(F.conv2d(x, dw, padding=1), want, atol=1e-4)
    assert mod.rank == 3 and mod.kind == "locon"
