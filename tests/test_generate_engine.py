"""txt2img, infotext, generate() with adapters through the shared model, and the CLI."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from studio.errors import StudioError


def _arr(im):
    return np.asarray(im, dtype=np.int16)


def test_txt2img_is_deterministic_and_batch_images_use_seed_plus_i(sd1_pipe):
    from studio.generate.engine import txt2img

    steps = []
    a = txt2img(sd1_pipe, "a (photo:1.2) of a dog", "blurry", steps=2, seed=5, batch=2,
                callback=lambda s, t: steps.append((s, t)))
    b = txt2img(sd1_pipe, "a (photo:1.2) of a dog", "blurry", steps=2, seed=5)
    c = txt2img(sd1_pipe, "a (photo:1.2) of a dog", "blurry", steps=2, seed=6)
    assert a[0].size == (64, 64) and len(a) == 2
    again = txt2img(sd1_pipe, "a (photo:1.2) of a dog", "blurry", steps=2, seed=5)
    assert np.array_equal(_arr(b[0]), _arr(again[0]))  # same seed, same call: same bits
    # in a batch, image i is the picture of seed + i (batched float maths may move a pixel level or two)
    assert np.abs(_arr(a[0]) - _arr(b[0])).max() <= 2
    assert np.abs(_arr(a[1]) - _arr(c[0])).max() <= 2
    assert np.abs(_arr(b[0]) - _arr(c[0])).max() > 20
    assert not np.array_equal(_arr(a[0]), _arr(a[1]))
    assert steps == [(1, 2), (2, 2)]


def test_txt2img_cancel_and_bad_input(sd1_pipe, sdxl_pipe):
    from studio.generate.engine import txt2img

    cancel = threading.Event()

    def stop_after_first(step, total):
        cancel.set()

    with pytest.raises(StudioError, match="Cancelled"):
        txt2img(sd1_pipe, "a dog", steps=3, callback=stop_after_first, cancel=cancel)
    with pytest.raises(StudioError, match="Unknown sampler 'Nope'"):
        txt2img(sd1_pipe, "a dog", steps=1, sampler="Nope")
    with pytest.raises(StudioError, match="multiples of 8"):
        txt2img(sd1_pipe, "a dog", steps=1, width=70, height=64)
    img = txt2img(sdxl_pipe, "a dog", steps=1, sampler="DPM++ 2M Karras", clip_skip=2)
    assert img[0].size == (64, 64)


def test_samplers_build_from_the_model_config(sd1_pipe):
    from studio.generate.samplers import make_scheduler, names, normalize, split_schedule

    for name in names():
        make_scheduler(name, sd1_pipe.scheduler.config)
    assert make_scheduler("DPM++ 2M Karras", sd1_pipe.scheduler.config).config.use_karras_sigmas
    assert not make_scheduler("DPM++ 2M", make_scheduler("DPM++ 2M Karras", sd1_pipe.scheduler.config).config
                              ).config.use_karras_sigmas
    assert normalize("DPM++ 2M", "Karras") == "DPM++ 2M Karras" and normalize("euler A") == "Euler a"
    assert split_schedule("DPM++ 2M SDE Karras") == ("DPM++ 2M SDE", "Karras")


def test_infotext_round_trip_and_a1111_text():
    from studio.generate.infotext import GenerationParams, format_infotext, parse_infotext

    p = GenerationParams(prompt="a photo of sks dog, (red:1.2)\nsecond line <lora:mydog:0.8>",
                         negative="blurry, lowres", steps=28, sampler="DPM++ 2M Karras", cfg=6.5, seed=1234,
                         width=512, height=768, clip_skip=2, model="v1-5", model_hash="6ce0161689",
                         lora_hashes={"mydog": "0123456789ab", "style": "ba9876543210"}, ti_hashes={"emb": "aa"},
                         extra={"Hires upscale": "2", "Note": 'says "hi", ok'})
    text = format_infotext(p)
    assert 'Lora hashes: "mydog: 0123456789ab, style: ba9876543210"' in text
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in text
    assert parse_infotext(text) == p
    a1111 = ("masterpiece, 1girl\nNegative prompt: worst quality\nSteps: 20, Sampler: Euler a, CFG scale: 7, "
             "Seed: 42, Size: 512x512, Model hash: abcdef1234, Model: anything, Clip skip: 2, "
             'Lora hashes: "x: 111111111111", Version: v1.10.1')
    q = parse_infotext(a1111)
    assert (q.prompt, q.negative, q.steps, q.sampler, q.cfg, q.seed, q.width, q.clip_skip, q.lora_hashes) == (
        "masterpiece, 1girl", "worst quality", 20, "Euler a", 7.0, 42, 512, 2, {"x": "111111111111"})
    assert q.extra == {"Version": "v1.10.1"}
    old_style = parse_infotext("p\nSteps: 5, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1, Size: 64x64")
    assert old_style.sampler == "DPM++ 2M Karras"
    assert parse_infotext("just a prompt, no params").prompt == "just a prompt, no params"
    with pytest.raises(StudioError, match="no generation parameters"):
        parse_infotext("  ")
    with pytest.raises(StudioError, match="Unreadable generation parameters"):
        parse_infotext("p\nSteps: many, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64")


def _lora_file(folder, pipe, name="mydog", seed=0):
    from studio.adapters import save_adapter
    from test_generate_apply import _random_lora

    return save_adapter(folder / f"{name}.safetensors", _random_lora(pipe, "sd1", seed=seed, scale=0.5), "sd1",
                        dtype=torch.float32)


def test_generate_applies_tags_saves_infotext_and_restores_the_shared_model(tmp_path, tiny_sd1, sd1_pipe):
    from studio.generate.engine import AdapterChoice, GenerateRequest, generate, txt2img
    from studio.generate.infotext import read_image_params
    from studio.models.loader import MODELS
    from studio.places import Settings

    lora = _lora_file(tmp_path, sd1_pipe)
    settings = Settings.load()
    settings.lora_dirs = [str(tmp_path)]
    settings.save()
    base = dict(model=str(tiny_sd1), steps=2, seed=7, device="cpu", dtype=torch.float32, out_dir=str(tmp_path / "o"))
    plain = generate(GenerateRequest(prompt="a dog", **base))
    pipe = MODELS.current.pipe
    weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    tagged = generate(GenerateRequest(prompt="a dog <lora:mydog:0.9>", **base))
    listed = generate(GenerateRequest(prompt="a dog", adapters=[AdapterChoice(str(lora), 0.9)], **base))
    assert MODELS.current.pipe is pipe  # never reloaded
    assert all(torch.equal(weights[k], v) for k, v in pipe.unet.state_dict().items())  # restored
    assert not np.array_equal(_arr(plain.images[0]), _arr(tagged.images[0]))
    assert np.array_equal(_arr(tagged.images[0]), _arr(listed.images[0]))
    assert np.array_equal(_arr(plain.images[0]), _arr(txt2img(sd1_pipe, "a dog", steps=2, seed=7)[0]))
    params = read_image_params(listed.paths[0])
    assert params.prompt == "a dog <lora:mydog:0.9>" and params.seed == 7 and params.steps == 2
    assert set(params.lora_hashes) == {"mydog"} and len(params.lora_hashes["mydog"]) == 12
    assert listed.paths[0].name.endswith("-7.png") and listed.paths[0] != tagged.paths[0]
    with pytest.raises(StudioError, match="<lora:nothere:...> in the prompt names no LoRA file"):
        generate(GenerateRequest(prompt="a <lora:nothere:1>", **base))


def test_cli_generate(tmp_path, tiny_sd1, sd1_pipe, capsys):
    from studio.cli import main
    from studio.generate.infotext import read_image_params

    lora = _lora_file(tmp_path, sd1_pipe, "style")
    out = tmp_path / "img.png"
    rc = main(["generate", "--model", str(tiny_sd1), "--prompt", "a (red:1.3) dog", "--negative", "blurry",
               "--lora", f"{lora}:0.5", "--seed", "3", "--steps", "2", "--cfg", "5", "--size", "64x64",
               "--sampler", "DPM++ 2M Karras", "--device", "cpu", "--out", str(out)])
    assert rc == 0 and out.exists()
    p = read_image_params(out)
    assert (p.prompt, p.negative, p.seed, p.steps, p.cfg, p.sampler, p.width) == (
        "a (red:1.3) dog <lora:style:0.5>", "blurry", 3, 2, 5.0, "DPM++ 2M Karras", 64)
    assert main(["generate", "--model", str(tiny_sd1), "--prompt", "x <lora:a:zz>", "--out", str(out)]) == 2
    assert "Bad weight 'zz'" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_sd1), "--prompt", "x", "--size", "big", "--out", str(out)]) == 2
