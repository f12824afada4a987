"""Textual Inversion and DreamBooth runs on tiny SD1 / SDXL: only the new embedding rows train and
diffusers' ``load_textual_inversion`` reproduces the trained text encoder; prior preservation with
generated class images (made once, reused) and the instance + lambda * prior loss from the two
halves of the batch; the full fine-tune's single-file checkpoint reloads and reproduces the UNet.

Runs are tiny (32 px, a few steps, one CPU thread).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from studio.errors import StudioError
from studio.train.config import TrainConfig, list_presets, resolve_config
from train_helpers import cfg_for as _cfg_for
from train_helpers import events_of, make_dataset

torch.set_num_threads(1)
TOKEN = "studiotok"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """4 images (64 px, one wide) with captions, in a kohya '1_dog' folder."""
    return make_dataset(tmp_path_factory.mktemp("ds"), "1_dog", lambda c: f"photo, {c}")


def cfg_for(model: Path, dataset: Path, out: Path, **kw) -> TrainConfig:
    return _cfg_for(model, dataset, out, **{"max_train_steps": 4, **kw})


def stop_after_two_steps(engine, monkeypatch):
    """Make the next run ask to stop after its second step (as a cancel would); returns what to
    put back so a following resume runs to the end."""
    calls = {"n": 0}
    real_stats = engine.memory_stats

    def stop_after_two(device):
        calls["n"] += 1
        if calls["n"] == 2:
            engine.request_stop()
        return real_stats(device)

    monkeypatch.setattr(engine, "memory_stats", stop_after_two)
    monkeypatch.setitem(engine._STOP, "requested", False)  # (teardown puts back the False it finds now)
    return real_stats


def _pipe(model: Path, family: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if family == "sdxl":
        return StableDiffusionXLPipeline.from_pretrained(model)
    return StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)


# ---- config --------------------------------------------------------------------------------

def test_new_keys_are_validated_by_name(tmp_path):
    inputs = {"base_model": "tiny:sd1", "dataset": str(tmp_path)}
    for raw, key in [({"method": "ti", "init_word": "cat"}, "'token'"), ({"method": "ti", "token": "mycat"},
                     "'init_word'"), ({"method": "dreambooth-lora"}, "'instance_prompt'")]:
        resolve_config(raw, need_inputs=False)  # a preset may leave them to the user...
        with pytest.raises(StudioError, match=key):  # ...a run may not
            resolve_config({**raw, **inputs})
    ok = resolve_config({"method": "ti", "token": "mycat", "init_word": "cat", "num_vectors": 3}, need_inputs=False)
    assert (ok.token, ok.num_vectors) == ("mycat", 3)
    bad = [({"method": "ti", "token": "my cat", "init_word": "cat"}, "'token'"),
           ({"method": "ti", "token": "mycat", "init_word": "cat", "num_vectors": 0}, "'num_vectors'"),
           ({"method": "dreambooth", "instance_prompt": "sks dog", "num_class_images": 0}, "'num_class_images'"),
           ({"method": "dreambooth", "instance_prompt": "sks dog", "prior_loss_weight": -1}, "'prior_loss_weight'"),
           ({"method": "dreambooth", "instance_prompt": "sks dog", "ema_decay": 1.5}, "'ema_decay'"),
           ({"method": "dreambooth-lora", "instance_prompt": "sks dog", "ema": True}, "'ema'"),
           ({"method": "lora", "extract_lora_rank": 8}, "'extract_lora_rank'"),
           ({"method": "lora", "class_prompt": "a dog"}, "'class_prompt'"),
           ({"method": "lora", "token": "x"}, "'token'"),
           ({"method": "dreambooth", "instance_prompt": "sks dog", "num_vectors": "two"}, "'num_vectors'")]
    for raw, key in bad:
        with pytest.raises(StudioError, match=key):
            resolve_config(raw, need_inputs=False)
    with pytest.raises(StudioError, match="'class_images_dir'"):
        resolve_config({"method": "dreambooth", "instance_prompt": "sks dog", "class_images_dir": "/nope/none",
                        "base_model": "tiny:sd1", "dataset": str(Path(__file__).parent)})


def test_presets_for_ti_and_dreambooth():
    names = {"sd15-ti", "sdxl-ti", "sd15-dreambooth-lora", "sd15-dreambooth-12gb", "sdxl-dreambooth-lora"}
    assert names <= set(list_presets())
    methods = {n: resolve_config({}, n, need_inputs=False).method for n in names}
    assert methods == {"sd15-ti": "ti", "sdxl-ti": "ti", "sd15-dreambooth-lora": "dreambooth-lora",
                       "sd15-dreambooth-12gb": "dreambooth", "sdxl-dreambooth-lora": "dreambooth-lora"}
    twelve = resolve_config({}, "sd15-dreambooth-12gb", need_inputs=False)
    assert twelve.optimizer == "adamw8bit" and twelve.gradient_checkpointing and twelve.mixed_precision == "fp16"

    from studio.train.estimate import estimate, lower_preset

    full = estimate(twelve, "sd1", {"name": "RTX 3060", "vram_gb": 12.0})
    assert 8 < full["vram_gb"] < 12 and full["fits"]  # the whole UNet trains: far more than a LoRA
    lora = resolve_config({}, "sd15-lora-12gb", need_inputs=False)
    assert full["vram_gb"] > estimate(lora, "sd1", {"name": "RTX 3060", "vram_gb": 12.0})["vram_gb"]
    assert lower_preset(lora, "sd1") == "sd15-lora-6gb"  # OOM advice stays within the method


def test_ti_token_expansion():
    from studio.train.ti import expand

    assert expand("a photo of tok, red", "tok", 3) == "a photo of tok tok_1 tok_2, red"
    assert expand("red", "tok", 2, prepend=True) == "tok tok_1, red"
    assert expand("", "tok", 1, prepend=True) == "tok"
    assert expand("toka tok-b", "tok", 2) == "toka tok-b"  # whole words only


# ---- textual inversion -----------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_ti_trains_only_the_new_rows_and_diffusers_reproduces_the_text_encoder(family, dataset, request, tmp_path,
                                                                                monkeypatch):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from studio.train.checkpoint import latest_checkpoint, load_checkpoint
    from studio.train.engine import train

    from studio.train import ti

    model = request.getfixturevalue(f"tiny_{family}")
    run = tmp_path / "run"
    cfg = cfg_for(model, dataset, run, method="ti", token=TOKEN, init_word="dog", num_vectors=2,
                  learning_rate=5e-2, save_every_n_steps=4, sample_every_n_steps=4,
                  sample_prompts=[f"a photo of {TOKEN}"], sample_steps=2)
    live = {}  # the trained embedding matrices themselves, as the run saves its result
    real_save = ti.save

    def capture(path, rows, *args, **kwargs):
        live["matrices"] = [r.weight.detach().clone() for r in rows]
        return real_save(path, rows, *args, **kwargs)

    monkeypatch.setattr(ti, "save", capture)
    out = train(cfg)
    assert out == run / f"{TOKEN}.safetensors"
    ev = events_of(run)
    assert [e["type"] for e in ev].count("step") == 4 and any(e["type"] == "sample" for e in ev)

    # The checkpoint keeps only the 2 trained rows of each matrix (not 49k-row matrices + moments).
    ck = load_checkpoint(latest_checkpoint(run))
    ck_rows = [v for k, v in ck["trainable"].items() if k.endswith("token_embedding.weight")]
    assert ck_rows and all(v.shape[0] == 2 for v in ck_rows)
    assert all(t.shape[0] == 2 for st in ck["optimizer"]["state"].values() for t in st.values() if t.dim() > 0)
    base = _pipe(model, family)
    encoders = [("text_encoder", base.text_encoder, base.tokenizer, "emb_params" if family == "sd1" else "clip_l")]
    if family == "sdxl":
        encoders.append(("text_encoder_2", base.text_encoder_2, base.tokenizer_2, "clip_g"))
    saved = load_file(str(out))
    assert set(saved) == {e[3] for e in encoders}
    trained_rows = []
    for (name, te, tok, key), full in zip(encoders, live["matrices"]):
        old = te.get_input_embeddings().weight.detach()
        vocab = old.shape[0]
        assert full.shape == (vocab + 2, old.shape[1])
        assert torch.equal(full[:vocab], old)  # every other row untouched, bit for bit
        init = old[tok.encode("dog", add_special_tokens=False)[0]]
        assert (full[vocab:] - init).abs().max() > 1e-3  # the new rows trained away from the init word
        assert torch.equal(saved[key], full[vocab:])  # and they are what the embedding file holds
        trained_rows.append(full)
    with safe_open(str(out), "pt") as fh:
        meta = fh.metadata()
    assert meta["modelspec.title"] == TOKEN and meta["ti_init_word"] == "dog" and meta["ss_steps"] == "4"

    # diffusers' loader, given the file, gives the trained text encoders' output for a prompt with the token.
    pipe = _pipe(model, family)
    if family == "sd1":
        pipe.load_textual_inversion(str(out), token=TOKEN)
    else:
        pipe.load_textual_inversion(saved["clip_l"], token=TOKEN, text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(saved["clip_g"], token=TOKEN, text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)
    prompt = f"a photo of {TOKEN}, red"
    loaded = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if family == "sdxl" else [])
    for (name, te, tok, key), full, te_loaded, tok_loaded in zip(encoders, trained_rows, loaded, tokenizers):
        text = pipe.maybe_convert_prompt(prompt, tok_loaded)
        assert text == f"a photo of {TOKEN} {TOKEN}_1, red"
        # the trained encoder: the base one with the checkpoint's matrix (new tokens appended in order)
        tok.add_tokens([TOKEN, f"{TOKEN}_1"])
        te.resize_token_embeddings(len(tok))
        with torch.no_grad():
            te.get_input_embeddings().weight.copy_(full)
            ids = tok(text, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
            ids_loaded = tok_loaded(text, padding="max_length", max_length=tok_loaded.model_max_length,
                                    return_tensors="pt").input_ids
            want = te(ids, output_hidden_states=True).hidden_states[-2]
            got = te_loaded(ids_loaded, output_hidden_states=True).hidden_states[-2]
            init_only = te(tok("a photo of dog dog, red", padding="max_length", max_length=tok.model_max_length,
                               return_tensors="pt").input_ids, output_hidden_states=True).hidden_states[-2]
        assert torch.equal(ids, ids_loaded)
        assert (want - init_only).abs().max() > 1e-4  # the token means something the init word did not
        assert torch.allclose(got, want, atol=1e-6), (got - want).abs().max()


def test_ti_refuses_a_token_the_tokenizer_already_knows(dataset, tiny_sd1, tmp_path):
    from studio.train.engine import train

    with pytest.raises(StudioError, match="'token'.*already"):
        train(cfg_for(tiny_sd1, dataset, tmp_path / "r", method="ti", token="dog", init_word="cat"))


# ---- DreamBooth ----------------------------------------------------------------------------------

def test_split_loss_takes_each_term_from_its_half():
    from studio.train.dreambooth import split_loss

    per = torch.tensor([1.0, 2.0, 3.0, 5.0])
    total, instance, prior = split_loss(per, 2, 0.5)
    assert (instance.item(), prior.item(), total.item()) == (1.5, 4.0, 3.5)


def test_dreambooth_lora_prior_preservation_reuses_class_images_and_splits_the_loss(dataset, tiny_sd1, tmp_path,
                                                                                  monkeypatch):
    from studio.adapters import load_adapter
    from studio.train import dreambooth as db
    from studio.train.engine import train

    seen = {"per_sample": [], "class": []}
    real_split, real_batch = db.split_loss, db.class_batch

    def spy_split(per_sample, n_instance, weight):
        seen["per_sample"].append((per_sample.detach().clone(), n_instance, weight))
        return real_split(per_sample, n_instance, weight)

    def spy_batch(*args):
        got = real_batch(*args)
        seen["class"].append(got)
        return got

    monkeypatch.setattr(db, "split_loss", spy_split)
    monkeypatch.setattr(db, "class_batch", spy_batch)
    common = dict(method="dreambooth-lora", instance_prompt="a photo of sks dog", class_prompt="a photo of a dog",
                  num_class_images=3, prior_loss_weight=0.5, sample_steps=2, max_train_steps=3)
    out = train(cfg_for(tiny_sd1, dataset, tmp_path / "r1", **common))

    first = events_of(tmp_path / "r1")
    (info,) = [e for e in first if "class_images_generated" in e]
    folder = Path(info["class_images_dir"])
    assert info["class_images_generated"] == 3 and info["class_images_reused"] == 0
    assert folder.parent.name == "class_images" and folder.name.startswith("sd1-")
    made = sorted(folder.glob("class-*.png"))
    assert len(made) == 3 and not list(folder.glob(".*"))  # whole files only, nothing half-written
    stamps = [p.stat().st_mtime_ns for p in made]

    # the loss: instance half + 0.5 * class half, from the per-image losses of one forward pass
    steps = [e for e in first if e["type"] == "step"]
    assert len(steps) == 3 == len(seen["per_sample"])
    for e, (per, n, weight), cls in zip(steps, seen["per_sample"], seen["class"]):
        assert n == 2 and per.shape == (4,) and weight == 0.5  # 2 instance + 2 class images
        assert all(c.path.parent == folder and c.caption == "a photo of a dog" for c in cls)
        assert e["loss_instance"] == pytest.approx(per[:2].mean().item(), abs=1e-6)
        assert e["loss_prior"] == pytest.approx(per[2:].mean().item(), abs=1e-6)
        assert e["loss"] == pytest.approx(e["loss_instance"] + 0.5 * e["loss_prior"], abs=1e-5)
    assert any(abs(e["loss_instance"] - e["loss_prior"]) > 1e-4 for e in steps)

    adapter = load_adapter(out)
    assert adapter.kind == "lora" and adapter.family == "sd1"
    assert adapter.metadata["ss_num_reg_images"] == "3"

    # a second run with the same model, class prompt and resolution generates none
    train(cfg_for(tiny_sd1, dataset, tmp_path / "r2", **common))
    (info2,) = [e for e in events_of(tmp_path / "r2") if "class_images_generated" in e]
    assert (info2["class_images_generated"], info2["class_images_reused"]) == (0, 3)
    assert [p.stat().st_mtime_ns for p in sorted(folder.glob("class-*.png"))] == stamps


def test_dreambooth_full_checkpoint_reloads_and_reproduces_the_tuned_unet(dataset, tiny_sd1, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from PIL import Image

    from studio.adapters import load_adapter
    from studio.models.loader import load_pipeline
    from studio.train.checkpoint import latest_checkpoint, load_checkpoint
    from studio.train.engine import train

    own = tmp_path / "class"  # class images supplied by the user
    own.mkdir()
    for i in range(2):
        Image.fromarray(np.full((40, 40, 3), 60 * (i + 1), np.uint8)).save(own / f"c{i}.png")
    run = tmp_path / "run"
    out = train(cfg_for(tiny_sd1, dataset, run, method="dreambooth", instance_prompt="a photo of sks dog",
                        class_prompt="a photo of a dog", class_images_dir=str(own), learning_rate=1e-3,
                        save_every_n_steps=4, save_dtype="fp16", extract_lora_rank=4))
    assert out == run / "adapter.safetensors"
    (info,) = [e for e in events_of(run) if "class_images_generated" in e]
    assert (info["class_images_generated"], info["class_images_reused"]) == (0, 2)

    trained = load_checkpoint(latest_checkpoint(run))["trainable"]
    tuned = UNet2DConditionModel.from_pretrained(tiny_sd1 / "unet")
    base_out = None
    g = torch.Generator().manual_seed(0)
    x, h = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        base_out = tuned(x, 500, h).sample
    tuned.load_state_dict({k[len("unet."):]: v for k, v in trained.items()})
    with torch.no_grad():
        want = tuned(x, 500, h).sample
    assert (want - base_out).abs().max() > 1e-3  # the UNet itself trained

    studio = load_pipeline(str(out), "cpu", torch.float32).pipe
    plain = StableDiffusionPipeline.from_single_file(str(out), config=str(tiny_sd1), local_files_only=True,
                                                     torch_dtype=torch.float32)
    halved = UNet2DConditionModel.from_pretrained(tiny_sd1 / "unet")  # the tuned weights rounded to fp16
    halved.load_state_dict({k[len("unet."):]: v.half().float() for k, v in trained.items()})
    with torch.no_grad():
        want16 = halved(x, 500, h).sample
    for pipe in (studio, plain):
        assert next(iter(pipe.unet.state_dict().values())).dtype == torch.float32
        with torch.no_grad():
            got = pipe.unet(x, 500, h).sample
        assert (got - want16).abs().max() <= 1e-5  # exactly the tuned UNet, in fp16
        assert (got - want).abs().max() <= 1e-3 * want.abs().max()  # fp16 rounding only

    lora = load_adapter(run / "adapter-lora.safetensors")
    assert lora.kind == "lora" and lora.family == "sd1" and lora.parts()["unet"] > 0
    assert not (run / "base-for-extract.safetensors").exists()


def test_dreambooth_full_with_ema_saves_the_average_and_resumes_exactly(dataset, tiny_sd1, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from studio.models.ldm import UNET_PREFIX
    from studio.train import engine
    from studio.train.checkpoint import latest_checkpoint, load_checkpoint

    common = dict(method="dreambooth", instance_prompt="a photo of sks dog", learning_rate=1e-3, ema=True,
                  ema_decay=0.5, save_every_n_steps=2, max_train_steps=4)
    ref = engine.train(cfg_for(tiny_sd1, dataset, tmp_path / "ref", **common))

    # the file holds the EMA weights (the checkpoint's ema.pt), not the last trained ones
    last = latest_checkpoint(tmp_path / "ref")
    raw = load_checkpoint(last)["trainable"]
    shadow = torch.load(last / engine.EMA_FILE, weights_only=True)["shadow_params"]
    saved = load_file(str(ref))
    key = "conv_in.weight"
    from diffusers import UNet2DConditionModel

    order = [n for n, _ in UNet2DConditionModel.from_pretrained(tiny_sd1 / "unet").named_parameters()]
    index = order.index(key)  # (EMA shadows follow unet.parameters())
    sgm = saved[UNET_PREFIX + "input_blocks.0.0.weight"]
    assert torch.equal(sgm, shadow[index].float())  # fp32 save: the average itself
    assert (sgm - raw["unet." + key]).abs().max() > 1e-6

    # stopped after 2 steps, then resumed: the same file as the uninterrupted run
    real_stats = stop_after_two_steps(engine, monkeypatch)
    run = tmp_path / "resumed"
    cfg = cfg_for(tiny_sd1, dataset, run, **common)
    engine.train(cfg)
    assert next(e for e in events_of(run) if e["type"] == "done")["cancelled"] is True
    engine._STOP["requested"] = False
    monkeypatch.setattr(engine, "memory_stats", real_stats)
    out = engine.train(cfg, run, resume=True)
    again = load_file(str(out))
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_ti_checkpoints_hold_only_the_new_rows_and_resume_exactly(family, dataset, request, tmp_path, monkeypatch):
    """Stopped after 2 steps and resumed from a rows-only checkpoint: the same embedding, bit for bit."""
    from safetensors.torch import load_file

    from studio.train import engine

    model = request.getfixturevalue(f"tiny_{family}")
    common = dict(method="ti", token=TOKEN, init_word="dog", num_vectors=2, learning_rate=5e-2,
                  weight_decay=1e-2, save_every_n_steps=2, max_train_steps=4)
    ref = load_file(str(engine.train(cfg_for(model, dataset, tmp_path / "ref", **common))))

    real_stats = stop_after_two_steps(engine, monkeypatch)
    run = tmp_path / "resumed"
    cfg = cfg_for(model, dataset, run, **common)
    engine.train(cfg)
    assert next(e for e in events_of(run) if e["type"] == "done")["cancelled"] is True
    from studio.train.checkpoint import latest_checkpoint

    last = latest_checkpoint(run)
    weights_bytes = (last / "trainable.safetensors").stat().st_size
    moments_bytes = (last / "optimizer.pt").stat().st_size
    engine._STOP["requested"] = False
    monkeypatch.setattr(engine, "memory_stats", real_stats)
    again = load_file(str(engine.train(cfg, run, resume=True)))
    assert ref.keys() == again.keys() and all(torch.equal(ref[k], again[k]) for k in ref)
    # the full matrices would be 761 rows x width x 4 bytes (x2 for AdamW's moments): a fraction is kept
    full = 761 * {"sd1": 32, "sdxl": 32 + 64}[family] * 4
    assert weights_bytes < full / 10 and moments_bytes < 2 * full / 10


def test_dreambooth_lora_on_sdxl_with_generated_class_images(dataset, tiny_sdxl, tmp_path):
    from studio.adapters import load_adapter
    from studio.train.engine import train

    out = train(cfg_for(tiny_sdxl, dataset, tmp_path / "r", method="dreambooth-lora", train_text_encoder=True,
                        instance_prompt="a photo of sks dog", class_prompt="a photo of a dog", num_class_images=2,
                        sample_steps=2, max_train_steps=2))
    ev = events_of(tmp_path / "r")
    (info,) = [e for e in ev if "class_images_generated" in e]
    assert info["class_images_generated"] == 2 and Path(info["class_images_dir"]).name.startswith("sdxl-")
    assert all("loss_prior" in e for e in ev if e["type"] == "step")
    adapter = load_adapter(out)
    assert adapter.family == "sdxl" and adapter.parts()["te1"] > 0 and adapter.parts()["te2"] > 0
