"""Files written by other tools read correctly: diffusers, diffusers->kohya, peft, SimpleTuner, A1111 embeddings."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from test_adapters_util import LOCON_TARGETS, UNET_TARGETS, adapt, fresh_pipe


def _adapted(family):
    pipe = fresh_pipe(family)
    cfg = lambda t: LoraConfig(r=4, lora_alpha=4, target_modules=t, init_lora_weights=False)  # noqa: E731
    models = adapt(pipe, family, cfg, unet_targets=UNET_TARGETS + LOCON_TARGETS)
    return pipe, models


def _assert_same_modules(f, ref):
    """``f`` read from another tool's file holds the same modules and deltas as the studio's own export."""
    assert set(f.modules) == set(ref.modules)
    for name, m in ref.modules.items():
        w = torch.zeros(m.kind_impl.delta_shape(m.shapes))
        assert torch.allclose(f.modules[name].delta(w), m.delta(w), atol=1e-6), name


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_diffusers_file_and_its_kohya_conversion(tmp_path, family):
    from diffusers.utils import convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict

    from studio.adapters import export_peft, load_adapter

    pipe, models = _adapted(family)
    ref = load_adapter(export_peft(tmp_path / "ref.safetensors", models, family, dtype=torch.float32))
    layers = {f"{c}_lora_layers": get_peft_model_state_dict(m) for c, m in models.items()}
    pipe.save_lora_weights(tmp_path / "diffusers", safe_serialization=True, **layers)
    dfile = tmp_path / "diffusers" / "pytorch_lora_weights.safetensors"
    f = load_adapter(dfile)
    assert f.format == "diffusers" and f.kind == "locon"
    if family == "sdxl":
        assert f.family == "sdxl"  # from evidence: a te2 part
    _assert_same_modules(f, ref)

    kohya = convert_state_dict_to_kohya(load_file(dfile))
    save_file(kohya, tmp_path / "converted.safetensors")
    g = load_adapter(tmp_path / "converted.safetensors")
    assert g.format == "kohya"
    if family == "sdxl":
        # diffusers keeps diffusers block names for the SDXL UNet; they are read as the SGM names webUIs map
        assert any(old.startswith("lora_unet_down_blocks_") for old, _ in g.renamed)
        assert not any(n.startswith("lora_unet_down_blocks_") for n in g.modules)
    # transformers>=5.6 CLIP has no text_model. level, so diffusers writes lora_te1_encoder_...: read as webUI names
    assert any(old.startswith("lora_te1_encoder_") for old, _ in g.renamed)
    _assert_same_modules(g, ref)


def test_peft_format_file(tmp_path):
    from peft.utils import get_peft_model_state_dict

    from studio.adapters import export_peft, load_adapter

    pipe, models = _adapted("sd1")
    ref = load_adapter(export_peft(tmp_path / "ref.safetensors", {"unet": models["unet"]}, "sd1", dtype=torch.float32))
    sd = {f"base_model.model.{k}": v for k, v in get_peft_model_state_dict(models["unet"]).items()}
    save_file(sd, tmp_path / "adapter_model.safetensors")
    f = load_adapter(tmp_path / "adapter_model.safetensors")
    assert f.format == "peft"
    _assert_same_modules(f, ref)  # no alpha in a peft file: diffusers and the studio use alpha = r


def test_simpletuner_lycoris_prefix_sdxl(tmp_path):
    from studio.adapters import export_peft, load_adapter
    from studio.adapters.keymap import build_keymap

    pipe, models = _adapted("sdxl")
    ref = load_adapter(export_peft(tmp_path / "ref.safetensors", {"unet": models["unet"]}, "sdxl",
                                   dtype=torch.float32))
    kmap = build_keymap(pipe, "sdxl")
    sd = {}
    for name, m in ref.modules.items():
        _, path = kmap.to_module(name)
        for suffix, t in m.tensors.items():
            sd[f"lycoris_{path.replace('.', '_')}.{suffix}"] = t
    save_file(sd, tmp_path / "st.safetensors", metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    f = load_adapter(tmp_path / "st.safetensors")
    assert f.format == "lycoris" and f.family == "sdxl" and not f.unknown_keys
    _assert_same_modules(f, ref)


def test_sd1_embedding_loads_in_diffusers(tmp_path):
    from studio.adapters import load_adapter, load_embedding, save_embedding

    pipe = fresh_pipe("sd1")
    vec = torch.randn(2, pipe.text_encoder.config.hidden_size)
    path = save_embedding(tmp_path / "sksdog.safetensors", {"emb_params": vec}, "sd1")
    emb = load_embedding(path)
    assert emb.name == "sksdog" and emb.family == "sd1" and torch.equal(emb.vectors["emb_params"], vec)
    f = load_adapter(path)
    assert f.kind == "embedding" and f.metadata["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"
    pipe.load_textual_inversion(str(path), token=emb.name)
    ids = pipe.tokenizer.convert_tokens_to_ids(["sksdog", "sksdog_1"])
    table = pipe.text_encoder.get_input_embeddings().weight
    assert torch.allclose(table[ids], vec)


def test_sdxl_embedding_loads_in_both_encoders(tmp_path):
    from studio.adapters import load_embedding, save_embedding

    pipe = fresh_pipe("sdxl")
    vl = torch.randn(3, pipe.text_encoder.config.hidden_size)
    vg = torch.randn(3, pipe.text_encoder_2.config.hidden_size)
    path = save_embedding(tmp_path / "ohwx.safetensors", {"clip_l": vl, "clip_g": vg}, "sdxl")
    emb = load_embedding(path)
    assert emb.family == "sdxl" and emb.n_vectors == 3
    pipe.load_textual_inversion(emb.vectors["clip_l"], token=emb.name, text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(emb.vectors["clip_g"], token=emb.name, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    for tok, te, v in ((pipe.tokenizer, pipe.text_encoder, vl), (pipe.tokenizer_2, pipe.text_encoder_2, vg)):
        ids = tok.convert_tokens_to_ids(["ohwx", "ohwx_1", "ohwx_2"])
        assert torch.allclose(te.get_input_embeddings().weight[ids], v)
    with pytest.raises(Exception, match="clip_l"):
        save_embedding(tmp_path / "bad.safetensors", {"emb_params": vl}, "sdxl")


def test_a1111_pt_embedding(tmp_path):
    from studio.adapters import load_adapter, load_embedding

    vec = torch.randn(4, 768)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": "mystyle", "step": 1500},
               tmp_path / "mystyle.pt")
    emb = load_embedding(tmp_path / "mystyle.pt")
    assert emb.name == "mystyle" and emb.family == "sd1" and emb.format == "a1111-pt"
    assert torch.equal(emb.vectors["emb_params"], vec) and emb.metadata["step"] == "1500"
    assert load_adapter(tmp_path / "mystyle.pt").kind == "embedding"
