"""Blending LoRAs: exact concat, factored SVD re-rank vs a dense SVD, dynamic rank, LyCORIS inputs,
per-block weights, family checks, metadata / recipe, and the result loaded back by diffusers."""

from __future__ import annotations

import json

import pytest
import torch

from test_merge_util import (ATTN1, ATTN2, CONVS, TARGETS, UP_ATTN, best_rank_k, random_lora_modules, rel, weight_shapes, weighted_sum,
                             write_lora)

WEIGHTS = (0.7, -0.3, 1.2)


@pytest.fixture(scope="module")
def shapes(sd1_pipe):
    return weight_shapes(sd1_pipe)


@pytest.fixture(scope="module")
def three_loras(tmp_path_factory, shapes):
    """Ranks 4 / 8 / 3, alphas 2 / 8 / 1.5; A and C have 3x3 conv modules; B lacks them and attn1, C lacks attn2."""
    d = tmp_path_factory.mktemp("loras")
    a = write_lora(d / "a.safetensors", random_lora_modules(shapes, 4, 2.0, seed=1))
    b_mods = random_lora_modules(shapes, 8, 8.0, seed=2, convs=False)
    for n in ATTN1:
        del b_mods[n]
    b = write_lora(d / "b.safetensors", b_mods)
    c_mods = random_lora_modules(shapes, 3, 1.5, seed=3)
    for n in ATTN2:
        del c_mods[n]
    c = write_lora(d / "c.safetensors", c_mods)
    return [a, b, c]


def _inputs(paths, weights=WEIGHTS, blocks=None):
    from studio.merge.blend import MergeInput

    return [MergeInput(p, w, blocks) for p, w in zip(paths, weights)]


def test_concat_equals_weighted_sum(tmp_path, three_loras):
    from studio.adapters import load_adapter
    from studio.merge.lora_merge import merge_adapters
    from test_merge_util import dense_deltas

    res = merge_adapters(_inputs(three_loras), tmp_path / "m.safetensors", "concat", dtype=torch.float32)
    want = weighted_sum(zip(three_loras, WEIGHTS))
    got = dense_deltas(res.path)
    assert set(got) == set(want) == set(TARGETS)
    for name in want:
        assert rel(got[name], want[name]) <= 1e-5, name
    f = load_adapter(res.path)
    # rank = sum of the ranks of the inputs that have the module; one alpha for the file
    assert f.modules[ATTN1[0]].rank == 4 + 3
    assert f.modules[ATTN2[0]].rank == 4 + 8
    assert f.modules[UP_ATTN[0]].rank == 4 + 8 + 3
    assert {m.alpha for m in f.modules.values()} == {4 + 8 + 3}  # the most common rank
    assert f.kind == "locon" and all(f.modules[n].is_conv() for n in CONVS)


@pytest.mark.parametrize("k", [2, 5])
def test_svd_rerank_equals_dense_truncation(tmp_path, three_loras, k):
    from studio.adapters import load_adapter
    from studio.merge.lora_merge import merge_adapters
    from test_merge_util import dense_deltas

    res = merge_adapters(_inputs(three_loras), tmp_path / "m.safetensors", "svd", rank=k, dtype=torch.float32)
    want = weighted_sum(zip(three_loras, WEIGHTS))
    got = dense_deltas(res.path)
    f = load_adapter(res.path)
    for name, m in want.items():
        assert f.modules[name].rank == k and f.modules[name].alpha == k
        assert rel(got[name], best_rank_k(m, k)) <= 1e-4, name
        # and it is a real truncation: not equal to the full sum
        assert rel(got[name], m) > 1e-3
    assert res.report.ranks == {k: len(TARGETS)}


def test_dynamic_rank_keeps_the_energy_fraction(tmp_path, three_loras):
    from studio.adapters import load_adapter
    from studio.merge.lora_merge import merge_adapters
    from test_merge_util import dense_deltas

    res = merge_adapters(_inputs(three_loras), tmp_path / "m.safetensors", "svd", rank=10, energy=0.8,
                         dtype=torch.float32)
    f = load_adapter(res.path)
    want = weighted_sum(zip(three_loras, WEIGHTS))
    got = dense_deltas(res.path)
    ranks = set()
    for name, m in want.items():
        s = torch.linalg.svdvals(m)
        frac = torch.cumsum(s ** 2, 0) / (s ** 2).sum()
        k = min(int((frac < 0.8).sum()) + 1, 10)  # smallest k reaching 80%, capped at 10
        assert f.modules[name].rank == k, name
        assert rel(got[name], best_rank_k(m, k)) <= 1e-4, name
        ranks.add(k)
    assert len(ranks) > 1  # the rank really varies by module
    assert res.report.min_kept_energy >= 0.8


def test_lycoris_inputs_go_through_their_deltas(tmp_path, shapes):
    """LoHa + LoKr + full + LoRA: concat is exact (dense path), SVD equals the dense truncation."""
    from studio.adapters import load_adapter
    from studio.merge.lora_merge import merge_adapters
    from test_merge_util import dense_deltas

    g = torch.Generator().manual_seed(7)
    lin = [n for n in TARGETS if len(shapes[n]) == 2 and shapes[n][0] % 2 == 0 and shapes[n][1] % 2 == 0][:3]
    loha, lokr, full = {}, {}, {}
    for n in lin:
        o, i = shapes[n]
        loha[n] = {"hada_w1_a": torch.randn(o, 2, generator=g), "hada_w1_b": torch.randn(2, i, generator=g),
                   "hada_w2_a": torch.randn(o, 2, generator=g), "hada_w2_b": torch.randn(2, i, generator=g),
                   "alpha": torch.tensor(1.0)}
        lokr[n] = {"lokr_w1": torch.randn(2, 2, generator=g), "lokr_w2": torch.randn(o // 2, i // 2, generator=g)}
        full[n] = {"diff": torch.randn(o, i, generator=g) * 0.1}
    paths = [write_lora(tmp_path / f"{k}.safetensors", mods) for k, mods in
             (("loha", loha), ("lokr", lokr), ("full", full))]
    paths.append(write_lora(tmp_path / "lora.safetensors", random_lora_modules({n: shapes[n] for n in lin}, 4, 4.0, 9)))
    assert [load_adapter(p).kind for p in paths] == ["loha", "lokr", "full", "lora"]
    weights = (0.5, -0.25, 1.0, 0.8)
    want = weighted_sum(zip(paths, weights))
    exact = merge_adapters(_inputs(paths, weights), tmp_path / "exact.safetensors", "concat", dtype=torch.float32)
    got = dense_deltas(exact.path)
    for n in lin:
        assert rel(got[n], want[n]) <= 1e-5, n
    cut = merge_adapters(_inputs(paths, weights), tmp_path / "cut.safetensors", "svd", rank=6, dtype=torch.float32)
    got = dense_deltas(cut.path)
    for n in lin:
        assert rel(got[n], best_rank_k(want[n], 6)) <= 1e-4, n
    assert load_adapter(cut.path).kind == "lora"


def test_block_weights(tmp_path, three_loras):
    from studio.merge.blend import block_of, block_weight, parse_blocks
    from studio.merge.lora_merge import merge_adapters
    from test_merge_util import dense_deltas

    # SD1 diffusers names and SDXL SGM names land in the same numbering
    assert block_of("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q") == "in4"
    assert block_of("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q") == "in4"
    assert block_of("lora_unet_up_blocks_1_attentions_2_proj_in") == "out5"
    assert block_of("lora_unet_down_blocks_0_downsamplers_0_conv") == "in3"
    assert block_of("lora_unet_mid_block_attentions_0_proj_in") == "mid"
    assert block_of("lora_te2_text_model_encoder_layers_0_mlp_fc1") == "te2"
    blocks = parse_blocks("te=0, out=0.5, in1=2")
    assert blocks == {"te": 0.0, "out": 0.5, "in1": 2.0}
    assert block_weight("lora_unet_down_blocks_0_attentions_0_proj_in", blocks) == 2.0  # in1 exact
    assert block_weight("lora_unet_down_blocks_0_attentions_1_proj_in", blocks) == 1.0  # in2: not given
    with pytest.raises(Exception, match="known key"):
        parse_blocks("foo=1")

    res = merge_adapters(_inputs(three_loras, blocks=blocks), tmp_path / "m.safetensors", "concat",
                         dtype=torch.float32)
    got = dense_deltas(res.path)
    plain = weighted_sum(zip(three_loras, WEIGHTS))
    assert not any(n.startswith("lora_te_") for n in got)  # te weight 0: left out
    for n, d in got.items():
        factor = block_weight(n, blocks)
        assert factor != 1.0 or block_of(n) == "in2" or n.startswith("lora_unet_down_blocks_1"), n
        assert rel(d, factor * plain[n]) <= 1e-5, n


def test_different_families_are_refused_by_name(tmp_path, three_loras):
    from studio.errors import StudioError
    from studio.merge.lora_merge import merge_adapters

    xl = write_lora(tmp_path / "xl_style.safetensors", {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj": {
        "lora_down.weight": torch.randn(2, 32), "lora_up.weight": torch.randn(32, 2), "alpha": torch.tensor(2.0)}},
        family="sdxl")
    with pytest.raises(StudioError) as err:
        merge_adapters(_inputs([three_loras[0], xl], (1.0, 1.0)), tmp_path / "m.safetensors")
    msg = str(err.value)
    assert "a.safetensors" in msg and "xl_style.safetensors" in msg and "sd1" in msg and "sdxl" in msg
    with pytest.raises(StudioError, match="rank"):
        merge_adapters(_inputs(three_loras), tmp_path / "m.safetensors", "svd")
    with pytest.raises(StudioError, match="also an input"):
        merge_adapters(_inputs(three_loras), three_loras[0])


def test_metadata_recipe_and_hashes(tmp_path, three_loras):
    from studio.adapters import load_adapter
    from studio.fileio import sshs_hashes
    from studio.merge.recipe import RECIPE_KEY, read_recipe

    from studio.merge.lora_merge import merge_adapters

    res = merge_adapters(_inputs(three_loras), tmp_path / "blend.safetensors", "svd", rank=4)
    f = load_adapter(res.path)
    meta = f.metadata
    assert (f.family, f.kind, f.dtype) == ("sd1", "locon", "float16")
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "4" and meta["ss_base_model_version"] == "sd_v1"
    assert json.loads(meta["ss_network_args"])["conv_dim"] == "4"
    assert meta["ss_output_name"] == "blend" and meta["modelspec.title"] == "blend"
    assert meta["modelspec.merged_from"] == "a, b, c"
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == sshs_hashes(res.path)
    recipe = read_recipe(meta)
    assert recipe == json.loads(meta[RECIPE_KEY]) and recipe["method"] == "svd" and recipe["rank"] == 4
    assert [(e["name"], e["weight"]) for e in recipe["inputs"]] == [(p.name, w) for p, w in zip(three_loras, WEIGHTS)]
    assert [e["sshs_model_hash"] for e in recipe["inputs"]] == [sshs_hashes(p)[0] for p in three_loras]


def test_diffusers_loads_the_merge_with_the_expected_effect(tmp_path, tiny_sd1, three_loras):
    """The merged file through diffusers' load_lora_weights changes the tiny model exactly by sum(w_i dW_i)."""
    from diffusers import StableDiffusionPipeline

    from studio.adapters.keymap import build_keymap
    from studio.merge.lora_merge import merge_adapters
    from test_adapters_util import outputs

    res = merge_adapters(_inputs(three_loras), tmp_path / "m.safetensors", "concat", dtype=torch.float32)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(res.path))
    got = outputs(pipe)

    ref = StableDiffusionPipeline.from_pretrained(tiny_sd1, safety_checker=None, requires_safety_checker=False)
    base = outputs(ref)
    kmap = build_keymap(ref, "sd1")
    with torch.no_grad():
        for name, d in weighted_sum(zip(three_loras, WEIGHTS)).items():
            comp, path = kmap.to_module(name)
            w = getattr(ref, comp).get_submodule(path).weight
            w += d.reshape(w.shape).to(w.dtype)
    want = outputs(ref)
    for part in ("unet", "text_encoder"):
        assert (want[part] - base[part]).abs().max() > 1e-2, part  # the merge does something
        assert torch.allclose(got[part], want[part], atol=1e-4, rtol=0), part


def test_inspect_shows_the_merge_recipe(tmp_path, three_loras):
    from studio.adapters.inspect import inspect_file
    from studio.fileio import sshs_hashes
    from studio.merge.lora_merge import merge_adapters
    from ui.inspect_tab import summary_markdown

    res = merge_adapters(_inputs(three_loras), tmp_path / "blend.safetensors", "concat")
    r = inspect_file(res.path)
    assert r["merge_recipe"]["method"] == "concat"
    assert [e["weight"] for e in r["merge_recipe"]["inputs"]] == list(WEIGHTS)
    md = summary_markdown(r)
    assert "Merged from" in md and "method concat" in md
    for p, w in zip(three_loras, WEIGHTS):  # each input with its weight and the hash A1111 shows
        assert f"{w:+.3f} x {p.name} ({sshs_hashes(p)[0][:12]})" in md
    assert inspect_file(three_loras[0])["merge_recipe"] is None


def test_merge_keeps_the_base_model_name_its_inputs_share(tmp_path, three_loras):
    from safetensors.torch import load_file, save_file

    from studio.adapters import load_adapter
    from studio.merge.blend import MergeInput
    from studio.merge.lora_merge import merge_adapters

    named = []
    for i, p in enumerate(three_loras):
        meta = dict(load_adapter(p).metadata, ss_sd_model_name="v1-5-pruned-emaonly")
        named.append(tmp_path / f"n{i}.safetensors")
        save_file(load_file(p), named[-1], metadata=meta)
    res = merge_adapters([MergeInput(p, w) for p, w in zip(named, WEIGHTS)], tmp_path / "m.safetensors", "concat")
    assert load_adapter(res.path).metadata["ss_sd_model_name"] == "v1-5-pruned-emaonly"
    res = merge_adapters([MergeInput(named[0], 1.0), MergeInput(three_loras[1], 1.0)], tmp_path / "m2.safetensors")
    assert "ss_sd_model_name" not in load_adapter(res.path).metadata  # inputs disagree: say nothing
