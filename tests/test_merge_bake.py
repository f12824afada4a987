"""Baking LoRAs into single-file checkpoints (streamed), resize, and extract from two checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from test_merge_util import TARGETS, random_lora_modules, rel, weight_shapes, write_lora

SDXL_TARGETS = [f"lora_te2_text_model_encoder_layers_0_{p}" for p in
                ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1")] + [
    f"lora_te1_text_model_encoder_layers_1_self_attn_{p}_proj" for p in "qkv"] + [
    "lora_te1_text_model_encoder_layers_1_self_attn_out_proj"] + [
    f"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_{p}" for p in ("to_q", "to_k", "to_v", "to_out_0")] + [
    "lora_unet_input_blocks_4_1_proj_in", "lora_unet_output_blocks_0_1_transformer_blocks_1_ff_net_2",
    "lora_unet_input_blocks_1_0_in_layers_2"]


def _pipe_outputs(pipe):
    from test_adapters_util import outputs

    return outputs(pipe)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_bake_equals_runtime_lora(tmp_path, family, request):
    """Baked (fp16) checkpoint == base + LoRAs applied at run time by diffusers (weights 0.8 and -0.5)."""
    from studio.fileio import read_safetensors_header, sshs_hashes
    from studio.merge.bake import bake
    from studio.merge.blend import MergeInput
    from studio.merge.recipe import read_recipe
    from studio.models.loader import load_pipeline

    base_file = request.getfixturevalue(f"tiny_{family}_file")
    base = load_pipeline(str(base_file), "cpu", torch.float32).pipe
    names = TARGETS if family == "sd1" else SDXL_TARGETS
    from test_merge_util import weight_shapes as ws

    shapes = ws(base, names) if family == "sd1" else _sdxl_shapes(base, names)
    a = write_lora(tmp_path / "a.safetensors", random_lora_modules(shapes, 4, 2.0, seed=11), family)
    b = write_lora(tmp_path / "b.safetensors", random_lora_modules(shapes, 2, 2.0, seed=12), family)
    res = bake(base_file, [MergeInput(a, 0.8), MergeInput(b, -0.5)], tmp_path / "baked.safetensors")
    assert res.n_modules == 2 * len(names)

    h = read_safetensors_header(res.path)
    assert {v["dtype"] for v in h.tensors.values()} <= {"F16", "I64"}
    assert set(h.tensors) == set(read_safetensors_header(base_file).tensors)
    # no sshs_* hash on a checkpoint (webUIs hash checkpoints themselves), and none copied from the base
    assert not any(k.startswith("sshs_") for k in h.metadata)
    recipe = read_recipe(h.metadata)
    assert recipe["base"]["name"] == base_file.name and [e["weight"] for e in recipe["inputs"]] == [0.8, -0.5]
    # the base is named by its cheap legacy hash and size (not re-hashed in full)
    assert recipe["base"]["sshs_legacy_hash"] == sshs_hashes(base_file)[1]
    assert recipe["base"]["size"] == base_file.stat().st_size
    assert h.metadata["modelspec.merged_from"] == f"tiny-{family}, a, b"  # base title first

    before = _pipe_outputs(base)
    base.load_lora_weights(str(a), adapter_name="a")
    base.load_lora_weights(str(b), adapter_name="b")
    base.set_adapters(["a", "b"], [0.8, -0.5])
    want = _pipe_outputs(base)
    got = _pipe_outputs(load_pipeline(str(res.path), "cpu", torch.float32).pipe)
    exact = bake(base_file, [MergeInput(a, 0.8), MergeInput(b, -0.5)], tmp_path / "fp32.safetensors", dtype=None)
    got32 = _pipe_outputs(load_pipeline(str(exact.path), "cpu", torch.float32).pipe)
    for part in want:
        assert (want[part] - before[part]).abs().max() > 1e-2, part  # the LoRAs do something here
        # fp16 file: only the rounding of every weight to fp16 (relative to the output's size). Only
        # the UNet: SDXL's 10-layer te2 alone drifts 1.3e-3 from rounding its weights alone.
        err = (got[part] - want[part]).abs().max() / want[part].abs().max()
        assert part != "unet" or err <= 1e-3, (part, float(err))
        # fp32 file: the same numbers as the run-time LoRA
        assert torch.allclose(got32[part], want[part], atol=1e-5, rtol=0), part


def _sdxl_shapes(pipe, names):
    from studio.adapters.keymap import build_keymap

    kmap = build_keymap(pipe, "sdxl")
    out = {}
    for n in names:
        comp, path = kmap.to_module(n)
        out[n] = tuple(getattr(pipe, comp).get_submodule(path).weight.shape)
    return out


def test_bake_refuses_other_family(tmp_path, tiny_sd1_file):
    from studio.errors import StudioError
    from studio.merge.bake import bake
    from studio.merge.blend import MergeInput

    xl = write_lora(tmp_path / "xl.safetensors", {"lora_te2_text_model_encoder_layers_0_mlp_fc1": {
        "lora_down.weight": torch.randn(2, 64), "lora_up.weight": torch.randn(128, 2), "alpha": torch.tensor(2.0)}},
        family="sdxl")
    with pytest.raises(StudioError, match="sd1 checkpoint but the adapters are sdxl"):
        bake(tiny_sd1_file, [MergeInput(xl, 1.0)], tmp_path / "out.safetensors")


def test_resize_keeps_scale_and_truncates(tmp_path, sd1_pipe):
    from studio.adapters import load_adapter
    from studio.merge.lora_merge import resize_adapter
    from test_merge_util import best_rank_k, dense_deltas

    src = write_lora(tmp_path / "src.safetensors", random_lora_modules(weight_shapes(sd1_pipe), 8, 4.0, seed=5))
    res = resize_adapter(src, tmp_path / "small.safetensors", rank=3)
    f = load_adapter(res.path)
    assert {m.rank for m in f.modules.values()} == {3}
    assert {m.alpha for m in f.modules.values()} == {1.5}  # alpha / rank kept: 4/8 == 1.5/3
    assert f.metadata["ss_network_dim"] == "3" and f.metadata["ss_network_alpha"] == "1.5"
    want, got = dense_deltas(src), dense_deltas(res.path)
    for n in want:
        assert rel(got[n], best_rank_k(want[n], 3)) <= 2e-3, n  # fp16 output
    assert json.loads(f.metadata["studio.merge_recipe"])["method"] == "resize"


def test_extract_recovers_a_baked_lora(tmp_path, tiny_sd1_file, sd1_pipe):
    """tuned = base + (rank-3 LoRA) baked in fp32; extract at rank 4 gives back the LoRA's delta."""
    from studio.adapters import load_adapter
    from studio.merge.bake import bake
    from studio.merge.blend import MergeInput
    from studio.merge.extract import extract
    from test_merge_util import dense_deltas

    shapes = weight_shapes(sd1_pipe)
    lora = write_lora(tmp_path / "l.safetensors", random_lora_modules(shapes, 3, 3.0, seed=21, convs=False))
    tuned = bake(tiny_sd1_file, [MergeInput(lora, 1.0)], tmp_path / "tuned.safetensors", dtype=None).path
    res = extract(tuned, tiny_sd1_file, tmp_path / "ex.safetensors", rank=4, conv_rank=4, dtype=torch.float32)
    f = load_adapter(res.path)
    want = dense_deltas(lora)
    got = dense_deltas(res.path)
    assert set(got) == set(want)  # only the changed modules are extracted
    for n in want:
        assert rel(got[n], want[n]) <= 1e-4, n
    assert f.family == "sd1" and f.kind == "locon"  # conv_shortcut came along (conv_rank)
    assert json.loads(f.metadata["studio.merge_recipe"])["method"] == "extract"


@pytest.mark.parametrize("config_name", ["sd1", "sd2", "sdxl", "tiny-sd1", "tiny-sdxl"])
def test_checkpoint_targets_from_keys_equal_the_model_module_list(config_name):
    """The bake's name -> checkpoint key map is read from the checkpoint's keys with the config alone;
    it must equal the map built from a real diffusers UNet's module list."""
    import json

    from diffusers import UNet2DConditionModel

    from studio.adapters.keymap import to_webui_name
    from studio.merge.ckptmap import _unet_targets
    from studio.models.ldm import UNET_PREFIX, unet_module_to_sgm
    from studio.models.loader import CONFIG_ROOT
    from studio.tiny import build_tiny_pipeline

    if config_name.startswith("tiny-"):
        family = config_name[5:]
        config = dict(build_tiny_pipeline(family).unet.config)
    else:
        family = config_name
        config = json.loads((CONFIG_ROOT / family / "unet" / "config.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    shapes, expected = {}, {}
    for key, value in unet.state_dict().items():
        module, _, param = key.rpartition(".")
        shapes[UNET_PREFIX + unet_module_to_sgm(module, unet.config) + "." + param] = tuple(value.shape)
    for path, m in unet.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            expected[to_webui_name("unet", path, family, unet.config)] = \
                UNET_PREFIX + unet_module_to_sgm(path, unet.config) + ".weight"
    got = {name: t.key for name, t in _unet_targets(shapes, config, family).items()}
    assert got == expected and len(got) > 100
