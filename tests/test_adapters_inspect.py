"""inspect_file / ``python -m studio inspect``: the report, its warnings, and bad input."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from studio.cli import main

TE2_Q = "lora_te2_text_model_encoder_layers_0_self_attn_{}_proj"


def lora(out, inp, r, alpha=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = {"lora_down.weight": torch.randn(r, inp, generator=g), "lora_up.weight": torch.randn(out, r, generator=g)}
    if alpha is not None:
        t["alpha"] = torch.tensor(float(alpha))
    return t


def sdxl_modules():
    """A small SDXL-named LoRA with real SDXL widths (2048 cross-attention, te1 768, te2 1280)."""
    m = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": lora(640, 2048, 4, 2),
         "lora_unet_middle_block_1_proj_in": lora(1280, 1280, 8, 4),
         "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": lora(768, 768, 4, 2)}
    for p in "qkv":
        m[TE2_Q.format(p)] = lora(1280, 1280, 4, 2)
    m[TE2_Q.format("out")] = lora(1280, 1280, 4, 2)
    return m


def test_report_fields_and_metadata_views(tmp_path):
    from studio.adapters import save_adapter
    from studio.adapters.inspect import inspect_file
    from studio.fileio import sshs_hashes

    meta = {"ss_tag_frequency": {"10_sks dog": {"sks dog": 12, "grass": 3}, "5_reg": {"grass": 2}},
            "ss_dataset_dirs": {"10_sks dog": {"n_repeats": 10, "img_count": 12}},
            "ss_steps": 500, "ss_learning_rate": "1e-4", "modelspec.trigger_phrase": "sks dog"}
    path = save_adapter(tmp_path / "dog.safetensors", sdxl_modules(), "sdxl", metadata=meta)
    r = inspect_file(path)
    assert (r["kind"], r["family"], r["format"], r["dtype"]) == ("lora", "sdxl", "kohya", "float16")
    assert r["modules"] == {"unet": 2, "te1": 1, "te2": 4}
    assert r["hash"] == sshs_hashes(path)[0] and r["short_hash"] == r["hash"][:12]
    assert r["rank"]["mixed"] and r["rank"]["most_common"] == 4 and r["per_module"][
        "lora_unet_middle_block_1_proj_in"] == {"kind": "lora", "rank": 8, "alpha": 4.0}
    assert r["trigger_words"] == ["sks dog"]
    assert r["tag_frequency"] == {"sks dog": 12, "grass": 5}
    assert r["dataset_dirs"]["10_sks dog"]["img_count"] == 12
    assert r["training"]["steps"] == "500" and r["modelspec"]["architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert r["warnings"] == []  # real SDXL widths, complete te2 layer, alphas present
    deep = inspect_file(path, deep=True)
    assert deep["hash_source"] == "computed" and deep["hash"] == r["hash"]
    labels = [k for k, _ in deep["block_norms"]]
    assert labels == ["in 04", "mid", "TE1 layer 00", "TE2 layer 00"]
    want = (lora(640, 2048, 4, 2)["lora_up.weight"].half().float() @ lora(640, 2048, 4, 2)["lora_down.weight"].half().float()) * 0.5
    assert deep["block_norms"][0][1] == pytest.approx(float(want.norm()), rel=1e-3)


def test_warnings(tmp_path):
    from studio.adapters import save_adapter
    from studio.adapters.inspect import inspect_file

    m = sdxl_modules()
    del m[TE2_Q.format("v")]  # A1111 skips a te2 layer unless q, k, v and out are all there
    m["lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"] = lora(640, 768, 4, 2)  # an SD1 width
    m["lora_unet_middle_block_1_proj_in"].pop("alpha")
    m["lora_unet_middle_block_1_proj_in"]["lora_up.weight"][0, 0] = float("nan")
    path = save_adapter(tmp_path / "w.safetensors", m, "sdxl")
    warnings = " | ".join(inspect_file(path, deep=True)["warnings"])
    assert "layer(s) [0] lack some of q/k/v/out" in warnings
    assert "768-wide text features; a sdxl model has 2048" in warnings
    assert "1 module(s) have no alpha" in warnings
    assert "NaN or Inf" in warnings
    assert "NaN" not in " ".join(inspect_file(path)["warnings"])  # header-only does not read tensors
    assert "tiny demo model" not in warnings
    # the same widths on a file trained on the tiny demo model: still said, but as expected
    tiny = save_adapter(tmp_path / "t.safetensors", m, "sdxl", metadata={"ss_sd_model_name": "tiny:sdxl"})
    assert "does not fit the family (expected: it was made on the tiny demo model)" in \
        " | ".join(inspect_file(tiny)["warnings"])

    # SDXL file with diffusers UNet names and a stray key, metadata without the family keys
    sd = {"lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 8),
          "lora_unet_down_blocks_1_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 2),
          "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 8),
          "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 2),
          "lora_unet_down_blocks_1_attentions_0_proj_in.scale": torch.tensor(1.0),
          "something_else": torch.zeros(3)}
    save_file(sd, tmp_path / "odd.safetensors", metadata={"ss_output_name": "odd"})
    r = inspect_file(tmp_path / "odd.safetensors")
    assert r["family"] == "sdxl" and r["family_source"] == "evidence"
    text = " | ".join(r["warnings"])
    assert "2 tensor(s) no webUI reads" in text and "something_else" in text
    # the studio reads the diffusers-named UNet module as its SGM name, and warns that webUIs would not
    assert "webUIs do not map (SDXL files need SGM block names" in text
    assert "read as lora_unet_input_blocks_4_1_proj_in" in text
    assert "A1111 lists this file as SD1" in text


def test_sd2_incomplete_attention_warning(tmp_path):
    from studio.adapters import save_adapter
    from studio.adapters.inspect import inspect_file

    m = {f"lora_te_text_model_encoder_layers_3_self_attn_{p}_proj": lora(1024, 1024, 2, 1) for p in "qk"}
    r = inspect_file(save_adapter(tmp_path / "sd2.safetensors", m, "sd2"))
    assert r["family"] == "sd2"
    assert any("text encoder: layer(s) [3] lack" in w for w in r["warnings"])


def test_cli_json_and_text(tmp_path, capsys):
    from studio.adapters import save_adapter

    path = save_adapter(tmp_path / "a.safetensors", sdxl_modules(), "sdxl")
    assert main(["inspect", str(path), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    for key in ("kind", "family", "format", "modules", "rank", "alpha", "dtype", "hash", "metadata", "warnings"):
        assert key in r, key
    assert len(r["hash"]) == 64
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "UNet 2, TE1 1, TE2 4" in out and r["hash"][:12] in out


class Boom:  # a pickle that asks to build a non-tensor object
    def __reduce__(self):
        return (print, ("pwned",))


def _bad_files(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 4), "lora_unet_x.lora_up.weight": torch.zeros(4, 2)},
              good)
    data = good.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    files = {
        "not safetensors": (b"hello, I am a text file, not a model at all" * 3, "not a valid safetensors file"),
        "empty": (b"", "only 0 bytes long"),
        "truncated": (data[:-8], "truncated"),
        "header past end": (struct.pack("<Q", n + 1000) + data[8:], "truncated"),
        "huge header": (struct.pack("<Q", 10**12) + b"{}", "claims"),
        "zip pickle": (b"PK\x03\x04" + b"\x00" * 100, "is a pickle"),
        "bad json": (struct.pack("<Q", 5) + b"{nope", "not JSON"),
        "checkpoint": (None, "holds no adapter weights"),
    }
    out = {}
    for label, (blob, msg) in files.items():
        p = tmp_path / (label.replace(" ", "_") + ".safetensors")
        if blob is None:
            save_file({"model.diffusion_model.out.2.weight": torch.zeros(2, 2)}, p)
        else:
            p.write_bytes(blob)
        out[label] = (p, msg)
    evil = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, 4)}, "x": Boom()}, evil)
    out["malicious pickle"] = (evil, "refused")
    out["missing"] = (tmp_path / "nope.safetensors", "does not exist")
    return out


def test_bad_input_is_a_clear_error_with_exit_2(tmp_path, capsys):
    from studio.adapters.inspect import inspect_file
    from studio.errors import StudioError

    for label, (path, msg) in _bad_files(tmp_path).items():
        with pytest.raises(StudioError, match=msg):
            inspect_file(path)
        assert main(["inspect", str(path), "--json"]) == 2, label
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err, (label, err)


def test_inspect_tab_builds_and_reports(tmp_path):
    import gradio as gr

    from studio.adapters import save_adapter
    from ui import inspect_tab
    from ui.context import AppContext

    ctx = AppContext(settings=None, workspace=None)
    with gr.Blocks():
        with gr.Tabs():
            with gr.Tab("Inspect", id="inspect"):
                inspect_tab.build(ctx)
    assert isinstance(ctx.components["inspect_path"], gr.Textbox)
    path = save_adapter(tmp_path / "a.safetensors", sdxl_modules(), "sdxl", metadata={"modelspec.trigger_phrase": "ohwx"})
    md, meta, fig = inspect_tab.run_inspect(str(path))
    assert "Modules: UNet **2** · TE1 **1** · TE2 **4**" in md and "`ohwx`" in md and "No problems found." in md
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and fig is not None
    md, meta, fig = inspect_tab.run_inspect(str(tmp_path / "missing.safetensors"))
    assert md.startswith("**Cannot inspect this file.**") and "does not exist" in md and fig is None
