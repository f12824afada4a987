"""Foundation: the model loading path, tiny models, safe file handling, CLI and app start-up."""

from __future__ import annotations

import json
import os
import pickle
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from studio.errors import StudioError
from studio.fileio import atomic_write_text, read_safetensors_header, save_safetensors
from studio.models.family import family_from_keys
from studio.models.loader import load_pipeline, resolve

ROOT = Path(__file__).resolve().parents[1]


def _unet_out(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = pipe.unet.config
    x = torch.randn(1, cfg.in_channels, 16, 16, generator=g)
    ctx = torch.randn(1, 7, cfg.cross_attention_dim, generator=g)
    kw = {}
    if cfg.addition_embed_type == "text_time":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pipe.text_encoder_2.config.projection_dim, generator=g),
                                   "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]], dtype=torch.float32)}
    with torch.no_grad():
        return pipe.unet(x, 500, encoder_hidden_states=ctx, **kw).sample


def _text_out(pipe):
    ids = pipe.tokenizer("a photo of sks dog", padding="max_length", max_length=77, return_tensors="pt").input_ids
    outs = []
    with torch.no_grad():
        outs.append(pipe.text_encoder(ids).last_hidden_state)
        if getattr(pipe, "text_encoder_2", None) is not None:
            outs.append(pipe.text_encoder_2(ids, output_hidden_states=True).hidden_states[-2])
    return outs


def _image(pipe):
    return pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_folder_and_single_file_load_identically(family, request):
    folder = request.getfixturevalue(f"tiny_{family}")
    single = request.getfixturevalue(f"tiny_{family}_file")
    a = load_pipeline(str(folder), "cpu", torch.float32)
    b = load_pipeline(str(single), "cpu", torch.float32)
    assert a.family == b.family == family
    assert b.source.kind == "single_file"
    assert (_unet_out(a.pipe) - _unet_out(b.pipe)).abs().max().item() <= 1e-6
    for ta, tb in zip(_text_out(a.pipe), _text_out(b.pipe)):
        assert (ta - tb).abs().max().item() <= 1e-6
    assert abs(_image(a.pipe) - _image(b.pipe)).max() <= 1e-6
    # Every weight arrived: nothing was left at its random initialisation.
    for comp in ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if family == "sdxl" else []):
        sa, sb = getattr(a.pipe, comp).state_dict(), getattr(b.pipe, comp).state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), comp


def test_sdxl_text_encoders_differ_in_width(sdxl_pipe):
    # The reference's trap: equal widths make diffusers load te1 weights into te2.
    assert sdxl_pipe.text_encoder.config.hidden_size != sdxl_pipe.text_encoder_2.config.hidden_size


def test_family_detection_both_layouts(tiny_sd1, tiny_sdxl, tiny_sd1_file, tiny_sdxl_file):
    assert resolve(str(tiny_sd1)).family == "sd1"
    assert resolve(str(tiny_sdxl)).family == "sdxl"
    assert resolve(str(tiny_sd1_file)).family == "sd1"
    assert resolve(str(tiny_sdxl_file)).family == "sdxl"


def test_family_rules_for_sd2_and_v_prediction():
    v2 = "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"
    keys = [v2, "cond_stage_model.model.token_embedding.weight"]
    shapes = {v2: (320, 1024)}
    assert family_from_keys(keys, shapes, {}, 'model:\n  params:\n    parameterization: "v"\n') == "sd2-v"
    assert family_from_keys(keys, shapes, {}, "model:\n  params:\n    linear_start: 0.00085\n") == "sd2"
    assert family_from_keys(keys, shapes, {"modelspec.prediction_type": "epsilon"}) == "sd2"
    assert family_from_keys(keys, shapes, {}) == "sd2-v"  # diffusers' default for SD2 without other evidence
    assert family_from_keys(["model.diffusion_model.x", "cond_stage_model.transformer.text_model.y"]) == "sd1"
    assert family_from_keys(["lora_unet_x.lora_down.weight"]) is None


def test_sd2_yaml_beside_checkpoint_sets_v_prediction(tmp_path):
    v2 = "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"
    f = tmp_path / "model.safetensors"
    save_safetensors(f, {v2: torch.zeros(4, 1024), "cond_stage_model.model.token_embedding.weight": torch.zeros(2, 2)})
    (tmp_path / "model.yaml").write_text("model:\n  params:\n    parameterization: \"v\"\n")
    assert resolve(str(f)).family == "sd2-v"
    (tmp_path / "model.yaml").write_text("model:\n  params:\n    timesteps: 1000\n")
    assert resolve(str(f)).family == "sd2"


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.ckpt"
    with open(ckpt, "wb") as fh:
        pickle.dump({"state_dict": {"x": _Evil(marker)}}, fh)
    with pytest.raises(StudioError, match="refused"):
        load_pipeline(str(ckpt), "cpu", torch.float32)
    assert not marker.exists()


def test_weights_only_ckpt_loads(tmp_path, tiny_sd1_file):
    from safetensors.torch import load_file

    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(tiny_sd1_file), "global_step": 1}, ckpt)
    # A .ckpt carries no configs: give it the tiny model's, as a user would give a .yaml / config folder.
    # Here we check the pickle path itself: it is read weights-only and converted once.
    src = resolve(str(ckpt))
    assert src.kind == "single_file" and src.family == ""
    from studio.models.loader import detect_family

    assert detect_family(str(ckpt)) == "sd1"


def test_truncated_safetensors_gives_clear_error(tmp_path, tiny_sd1_file):
    data = tiny_sd1_file.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(StudioError, match="truncated"):
        load_pipeline(str(cut), "cpu", torch.float32)


@pytest.mark.parametrize("blob,match", [
    (b"", "only 0 bytes"),
    (struct.pack("<Q", 10**12) + b"{}", "header claims"),
    (struct.pack("<Q", 5000) + b"{}", "truncated"),
    (struct.pack("<Q", 4) + b"nope", "not JSON"),
    (b"\x80\x04\x95" + b"\x00" * 40, "pickle"),
])
def test_bad_safetensors_headers(tmp_path, blob, match):
    f = tmp_path / "bad.safetensors"
    f.write_bytes(blob)
    with pytest.raises(StudioError, match=match):
        read_safetensors_header(f)


def test_missing_tokenizer_for_bare_single_file_is_named(tmp_path, tiny_sd1_file):
    # Strip the tiny model's embedded configs: the loader falls back to the shipped SD1 configs,
    # which need the real CLIP tokenizer. Offline and not cached, that must be a clear message.
    from safetensors import safe_open
    from safetensors.torch import load_file

    meta = dict(safe_open(str(tiny_sd1_file), "pt").metadata())
    meta.pop("studio.configs")
    bare = tmp_path / "bare.safetensors"
    save_safetensors(bare, load_file(tiny_sd1_file), meta)
    with pytest.raises(StudioError, match="tokenizer") as err:
        load_pipeline(str(bare), "cpu", torch.float32)
    assert "openai/clip-vit-large-patch14" in str(err.value)


def test_hub_id_offline_gives_clear_error():
    with pytest.raises(StudioError, match="hub"):
        load_pipeline("someone/not-a-cached-model", "cpu", torch.float32)


def test_unknown_path_and_non_model_file(tmp_path):
    with pytest.raises(StudioError, match="not found"):
        resolve(str(tmp_path / "nope.safetensors"))
    f = tmp_path / "notes.txt"
    f.write_text("hi")
    with pytest.raises(StudioError, match="not a model file"):
        resolve(str(f))
    lora = tmp_path / "lora.safetensors"
    save_safetensors(lora, {"lora_unet_x.lora_down.weight": torch.zeros(2, 2)})
    with pytest.raises(StudioError, match="Inspect"):
        resolve(str(lora))


def test_tiny_spec_builds_demo_model_into_workspace():
    from studio.models.loader import MODELS

    m = MODELS.get("tiny:sd1", "cpu", torch.float32)
    assert m.family == "sd1" and m.source.path.joinpath("model_index.json").exists()
    assert MODELS.get("tiny:sd1", "cpu", torch.float32) is m  # resident, not reloaded
    MODELS.unload()


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    from studio.fileio import atomic_write

    f = tmp_path / "caption.txt"
    atomic_write_text(f, "old")

    def boom(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(f, boom)
    assert f.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["caption.txt"]  # no temp file left behind


def test_settings_persist_and_survive_corruption(tmp_path):
    from studio.places import Settings

    s = Settings.load()
    s.models_dirs = [str(tmp_path)]
    s.save()
    assert Settings.load().models_dirs == [str(tmp_path)]
    Settings.path().write_text("{not json")
    assert Settings.load().models_dirs == []
    assert Settings.path().with_suffix(".json.broken").exists()


def test_discovery_finds_checkpoints_in_webui_folders(tmp_path, tiny_sd1_file):
    import shutil

    from studio.models.discovery import discover_models

    webui = tmp_path / "stable-diffusion-webui"
    (webui / "models" / "Stable-diffusion").mkdir(parents=True)
    shutil.copy(tiny_sd1_file, webui / "models" / "Stable-diffusion" / "mine.safetensors")
    save_safetensors(webui / "models" / "Stable-diffusion" / "a_lora.safetensors",
                     {"lora_unet_x.lora_down.weight": torch.zeros(2, 2)})
    found = {e.label: e for e in discover_models([str(webui)])}
    assert found["mine.safetensors"].family == "sd1"
    assert "a_lora.safetensors" not in found  # LoRAs are not base models
    assert any(e.spec == "tiny:sd1" for e in found.values())


def _run_cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "studio", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)}, **kw)


def test_cli_help_and_tiny_model(tmp_path):
    r = _run_cli("--help")
    assert r.returncode == 0 and "tiny-model" in r.stdout
    out = tmp_path / "m.safetensors"
    r = _run_cli("tiny-model", str(out), "--family", "sdxl", "--single-file")
    assert r.returncode == 0, r.stderr
    assert resolve(str(out)).family == "sdxl"
    r = _run_cli("model-info", str(tmp_path / "missing.safetensors"))
    assert r.returncode == 2 and "not found" in r.stderr and "Traceback" not in r.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_app_serves_five_tabs(tmp_path):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "app.py", "--no-browser", "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                    assert r.status == 200
                    break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise AssertionError("studio did not start:\n" + (proc.stdout.read() if proc.poll() is not None else ""))
                time.sleep(0.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=10) as r:
            config = json.load(r)
        labels = [c["props"].get("label") for c in config["components"] if c["type"] == "tabitem"]
        for tab in ["Dataset", "Train", "Merge", "Generate", "Inspect"]:
            assert tab in labels
        assert config.get("analytics_enabled") is False
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# Parameter counts of the released models (diffusers / transformers classes), as published with
# them: they pin every width and layer count of the configs shipped for bare single-file checkpoints.
RELEASED_SIZES = {"sd1": (859_520_964, 83_653_863, 123_060_480, None),
                  "sd2": (865_910_724, 83_653_863, 340_387_840, None),
                  "sd2-v": (865_910_724, 83_653_863, 340_387_840, None),
                  "sdxl": (2_567_463_684, 83_653_863, 123_060_480, 694_659_840)}


@pytest.mark.parametrize("family", sorted(RELEASED_SIZES))
def test_shipped_configs_build_the_released_architectures(family):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from studio.models.loader import CONFIG_ROOT

    def count(model):
        return sum(p.numel() for p in model.parameters())

    def cfg(part):
        return json.loads((CONFIG_ROOT / family / part / "config.json").read_text())

    with torch.device("meta"):  # no memory: only the shapes
        got = (count(UNet2DConditionModel.from_config(cfg("unet"))), count(AutoencoderKL.from_config(cfg("vae"))),
               count(CLIPTextModel(CLIPTextConfig(**cfg("text_encoder")))),
               count(CLIPTextModelWithProjection(CLIPTextConfig(**cfg("text_encoder_2")))) if family == "sdxl"
               else None)
    assert got == RELEASED_SIZES[family]
    sched = json.loads((CONFIG_ROOT / family / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == ("v_prediction" if family == "sd2-v" else "epsilon")


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_webui_layout_of_real_shaped_models_reads_back_in_diffusers(family):
    """Checkpoints the studio writes (bake, DreamBooth) for real SD1 / SD2 / SDXL shapes: diffusers' own
    single-file converters map every key back to its module with its shape (meta tensors: no memory).
    The tiny-model tests check the values; this checks the real block layouts (SDXL's 10-deep blocks)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from studio.models.ldm import TE_PREFIXES, clip_to_ldm, open_clip_to_ldm, unet_to_ldm, vae_to_ldm
    from studio.models.loader import CONFIG_ROOT

    def cfg(part):
        return json.loads((CONFIG_ROOT / family / part / "config.json").read_text())

    def same(model_sd, back):
        model_sd = {k: v for k, v in model_sd.items() if not k.endswith("position_ids")}
        if not any(k.startswith("text_model.") for k in model_sd):  # transformers>=5.6 CLIPTextModel
            back = {k.removeprefix("text_model."): v for k, v in back.items()}
        assert set(back) == set(model_sd)
        assert all(tuple(back[k].shape) == tuple(v.shape) for k, v in model_sd.items())

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg("unet"))
        same(unet.state_dict(), convert_ldm_unet_checkpoint(unet_to_ldm(unet), dict(unet.config)))
        vae = AutoencoderKL.from_config(cfg("vae"))
        same(vae.state_dict(), convert_ldm_vae_checkpoint(vae_to_ldm(vae.state_dict()), dict(vae.config)))
        te = CLIPTextModel(CLIPTextConfig(**cfg("text_encoder")))
        if family == "sd2":
            prefix = TE_PREFIXES[("sd2", 1)]
            same(te.state_dict(), convert_open_clip_checkpoint(te, open_clip_to_ldm(te.state_dict(), prefix), prefix))
        else:
            prefix = TE_PREFIXES[(family, 1)]
            same(te.state_dict(), convert_ldm_clip_checkpoint(clip_to_ldm(te.state_dict(), prefix),
                                                              prefix.replace("text_model.", "")))
        if family == "sdxl":
            te2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg("text_encoder_2")))
            prefix = TE_PREFIXES[("sdxl", 2)]
            same(te2.state_dict(), convert_open_clip_checkpoint(te2, open_clip_to_ldm(te2.state_dict(), prefix), prefix))
