"""Adapters applied the webUI way: equal to diffusers' own LoRA loader and to peft's merged models,
and removed bit for bit."""

from __future__ import annotations

import pytest
import torch

SD1_UNET = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
SD1_TE = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def _fresh(path, dtype=torch.float32):
    from studio.models.loader import load_pipeline

    return load_pipeline(str(path), "cpu", dtype).pipe


def _random_lora(pipe, family, rank=4, alpha=2.0, te=True, seed=0, scale=0.2):
    """A kohya LoRA over every attention/ff Linear of the UNet (and CLIP layers): webUI name -> tensors."""
    from studio.adapters.keymap import build_keymap
    from studio.adapters.lora import from_factors

    g = torch.Generator().manual_seed(seed)
    kmap = build_keymap(pipe, family)
    modules = {}
    for name in sorted(kmap.names()):
        comp, path = kmap.to_module(name)
        mod = getattr(pipe, comp).get_submodule(path)
        ok = (comp == "unet" and "attentions" in path and isinstance(mod, torch.nn.Linear)
              and any(path.endswith(t) for t in SD1_UNET))
        ok = ok or (te and comp != "unet" and any(path.endswith(t) for t in SD1_TE))
        if not ok:
            continue
        out_f, in_f = mod.weight.shape
        down = torch.randn(rank, in_f, generator=g) * scale
        up = torch.randn(out_f, rank, generator=g) * scale
        modules[name] = from_factors(down, up, alpha)
    assert modules
    return modules


def _unet_out(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = pipe.unet.config
    sample = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77, cfg.cross_attention_dim, generator=g)
    extra = {}
    if cfg.addition_embed_type == "text_time":
        pooled = torch.randn(1, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim, generator=g)
        extra["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": torch.tensor([[64., 64., 0., 0., 64., 64.]])}
    with torch.no_grad():
        return pipe.unet(sample, 500, encoder_hidden_states=ctx, **extra).sample


def _te_out(pipe):
    ids = pipe.tokenizer("a photo of sks dog", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids).last_hidden_state


def _snapshot(pipe):
    return {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder", "text_encoder_2", "vae")
            if getattr(pipe, c, None) is not None for k, v in getattr(pipe, c).state_dict().items()}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_lora_equals_diffusers_load_lora_weights(tmp_path, family, request):
    from studio.adapters import load_adapter, save_adapter
    from studio.generate.apply import AdapterStack, StackEntry

    model = request.getfixturevalue(f"tiny_{family}")
    ours = _fresh(model)
    path = save_adapter(tmp_path / "l.safetensors", _random_lora(ours, family), family, dtype=torch.float32)
    base_out = _unet_out(ours)
    stack = AdapterStack(ours)
    report = stack.set([StackEntry(load_adapter(path), unet=0.7, te=0.7, name="l")])
    assert not report.unmatched

    theirs = _fresh(model)
    theirs.load_lora_weights(str(path), adapter_name="l")
    theirs.set_adapters(["l"], [0.7])
    want = _unet_out(theirs)
    got = _unet_out(ours)
    assert (want - base_out).abs().max() > 1e-2  # the LoRA does change the output
    assert (got - want).abs().max() <= 1e-4
    if family == "sd1":
        assert (_te_out(ours) - _te_out(theirs)).abs().max() <= 1e-4


def test_unet_and_te_weights_are_separate(tmp_path, tiny_sd1):
    from studio.adapters import load_adapter, save_adapter
    from studio.generate.apply import AdapterStack, StackEntry

    pipe = _fresh(tiny_sd1)
    base_unet, base_te = _unet_out(pipe), _te_out(pipe)
    path = save_adapter(tmp_path / "l.safetensors", _random_lora(pipe, "sd1"), "sd1", dtype=torch.float32)
    stack = AdapterStack(pipe)
    stack.set([StackEntry(load_adapter(path), unet=1.0, te=0.0)])
    assert torch.equal(_te_out(pipe), base_te)
    assert not torch.allclose(_unet_out(pipe), base_unet, atol=1e-3)
    stack.set([StackEntry(load_adapter(path), unet=0.0, te=1.0)])
    assert torch.equal(_unet_out(pipe), base_unet)
    assert not torch.allclose(_te_out(pipe), base_te, atol=1e-3)


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_lycoris_equals_peft_merged_model(tmp_path, tiny_sd1, kind):
    from peft import LoHaConfig, LoKrConfig, get_peft_model

    from studio.adapters import export_peft, load_adapter
    from studio.generate.apply import AdapterStack, StackEntry

    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2"]
    cfg = (LoHaConfig(r=3, alpha=5, target_modules=targets, init_weights=False) if kind == "loha"
           else LoKrConfig(r=2, alpha=3, target_modules=targets, init_weights=False))
    peft_pipe = _fresh(tiny_sd1)
    torch.manual_seed(3)
    peft_unet = get_peft_model(peft_pipe.unet, cfg)
    path = export_peft(tmp_path / f"{kind}.safetensors", {"unet": peft_unet}, "sd1", dtype=torch.float32)
    peft_pipe.unet = peft_unet.merge_and_unload()
    want = _unet_out(peft_pipe)

    pipe = _fresh(tiny_sd1)
    base = _unet_out(pipe)
    f = load_adapter(path)
    assert f.kind == kind
    AdapterStack(pipe).set([StackEntry(f, unet=1.0)])
    got = _unet_out(pipe)
    assert (want - base).abs().max() > 1e-2
    assert (got - want).abs().max() <= 1e-4


def test_clear_restores_base_bit_for_bit_in_half_precision(tmp_path, tiny_sd1):
    """fp16 weights: W + d - d != W in fp16, so restoring must copy the originals back."""
    from studio.adapters import load_adapter, save_adapter
    from studio.generate.apply import AdapterStack, StackEntry

    pipe = _fresh(tiny_sd1, torch.float16)
    before = _snapshot(pipe)
    a = save_adapter(tmp_path / "a.safetensors", _random_lora(pipe, "sd1", seed=1), "sd1")
    b = save_adapter(tmp_path / "b.safetensors", _random_lora(pipe, "sd1", seed=2, te=False), "sd1")
    stack = AdapterStack(pipe)
    fa, fb = load_adapter(a), load_adapter(b)
    stack.set([StackEntry(fa, 0.8), StackEntry(fb, 1.3, te=0.5)])
    changed = _snapshot(pipe)
    assert sum(not torch.equal(before[k], changed[k]) for k in before) > 50
    stack.set([StackEntry(fa, 0.3), StackEntry(fb, -1.0)])
    stack.clear()
    after = _snapshot(pipe)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert stack.n_backed_up == 0


def test_weight_change_recomputes_only_that_adapter_and_keeps_the_model(tmp_path, tiny_sd1):
    from studio.adapters import load_adapter, save_adapter
    from studio.generate.apply import AdapterStack, StackEntry

    pipe = _fresh(tiny_sd1)
    unet_id = id(pipe.unet)
    a = load_adapter(save_adapter(tmp_path / "a.safetensors", _random_lora(pipe, "sd1", seed=1), "sd1",
                                  dtype=torch.float32))
    te_only = {k: v for k, v in _random_lora(pipe, "sd1", seed=2).items() if k.startswith("lora_te_")}
    b = load_adapter(save_adapter(tmp_path / "b.safetensors", te_only, "sd1", dtype=torch.float32))
    stack = AdapterStack(pipe)
    first = stack.set([StackEntry(a, 1.0), StackEntry(b, 1.0)])
    assert first.touched == len(a.modules)  # b's modules are a subset of a's
    again = stack.set([StackEntry(a, 1.0), StackEntry(b, 1.0)])
    assert again.touched == 0
    changed = stack.set([StackEntry(a, 1.0), StackEntry(b, 0.5)])
    assert changed.touched == len(b.modules)
    out_now = _unet_out(pipe)
    fresh = _fresh(tiny_sd1)
    AdapterStack(fresh).set([StackEntry(a, 1.0), StackEntry(b, 0.5)])
    assert torch.allclose(_unet_out(fresh), out_now, atol=1e-6)
    assert id(pipe.unet) == unet_id


def test_adapter_of_another_family_is_refused(tmp_path, tiny_sd1, tiny_sdxl):
    from studio.adapters import load_adapter, save_adapter
    from studio.errors import StudioError
    from studio.generate.apply import AdapterStack, StackEntry

    xl = _fresh(tiny_sdxl)
    path = save_adapter(tmp_path / "xl.safetensors", _random_lora(xl, "sdxl", te=False), "sdxl")
    pipe = _fresh(tiny_sd1)
    with pytest.raises(StudioError, match="sdxl adapter; the base model is sd1"):
        AdapterStack(pipe).set([StackEntry(load_adapter(path), 1.0, name="xl")])
