"""Training engine: config validation, events, every method on tiny SD1 / SDXL, the exported LoRA
in diffusers, SIGKILL + resume equality, SIGTERM cancel, latent caching, accelerate 2 processes.

Runs are tiny (32 px images, a handful of steps, one CPU thread) to stay fast on a shared CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from studio.errors import StudioError
from studio.train.config import list_presets, resolve_config
from train_helpers import cfg_for, events_of, make_dataset

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """4 images (64 px; one wide; trained at 32 px) with tag captions, in a kohya '2_sks dog' folder."""
    return make_dataset(tmp_path_factory.mktemp("ds"), "2_sks dog", lambda c: f"sks dog, {c}, photo")


def run_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


# ---- config --------------------------------------------------------------------------------

def test_unknown_key_and_bad_values_are_refused_by_name(tmp_path):
    with pytest.raises(StudioError, match="'learnig_rate'.*") as err:
        resolve_config({"learnig_rate": 1e-4}, need_inputs=False)
    assert "learning_rate" in str(err.value)  # the suggestion
    with pytest.raises(StudioError, match="'rank' must be a whole number"):
        resolve_config({"rank": "eight"}, need_inputs=False)
    with pytest.raises(StudioError, match="'method' must be one of"):
        resolve_config({"method": "lycoris"}, need_inputs=False)
    with pytest.raises(StudioError, match="'optimizer'"):
        resolve_config({}, sets=["optimizer=sgd"], need_inputs=False)
    with pytest.raises(StudioError, match="'dataset'"):
        resolve_config({"base_model": "tiny:sd1", "dataset": str(tmp_path / "nope")})
    with pytest.raises(StudioError, match="--set 'rank' is not key=value|is not key=value"):
        resolve_config({}, sets=["rank"], need_inputs=False)


def test_preset_config_and_set_merge_in_order(tmp_path):
    assert {"sd15-lora-6gb", "sd15-lora-12gb", "sdxl-lora-8gb", "sdxl-lora-12gb", "sdxl-lora-24gb"} <= set(list_presets())
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"rank": 4, "batch_size": 3}))
    cfg = resolve_config(cfg_file, "sdxl-lora-8gb", ["rank=6", "sample_prompts=[\"a\", \"b\"]", "fp8_base=false"],
                         need_inputs=False)
    assert (cfg.resolution, cfg.optimizer) == (1024, "adafactor")  # from the preset
    assert cfg.batch_size == 3 and cfg.rank == 6 and cfg.sample_prompts == ["a", "b"] and cfg.fp8_base is False
    for name in list_presets():  # every preset is a valid config
        resolve_config({}, name, need_inputs=False)


def test_ti_and_dreambooth_methods_need_their_own_keys(dataset, tiny_sd1, tmp_path):
    # (implemented by the TI / DreamBooth issue: tests/test_train_ti_db.py)
    with pytest.raises(StudioError, match="'instance_prompt'"):
        cfg_for(tiny_sd1, dataset, tmp_path / "r", method="dreambooth")
    with pytest.raises(StudioError, match="'token'"):
        cfg_for(tiny_sd1, dataset, tmp_path / "r", method="ti")


def test_event_reader_tolerates_a_torn_last_line_and_writer_repairs_it(tmp_path):
    from studio.train.events import EventTail, EventWriter, read_events

    path = tmp_path / "events.jsonl"
    w = EventWriter(path)
    w.emit("start", step=0)
    w.close()
    with open(path, "ab") as fh:
        fh.write(b'{"type": "step", "st')  # a writer killed mid-line
    assert [e["type"] for e in read_events(path)] == ["start"]
    w = EventWriter(path)
    w.emit("done", output="x")
    w.close()
    assert [e["type"] for e in read_events(path)] == ["start", "done"]
    tail = EventTail(path)
    assert len(tail.poll()) == 2 and tail.poll() == []


def test_estimate_and_oom_advice_name_the_lower_preset():
    from studio.train.estimate import estimate, oom_advice

    gpu = {"name": "NVIDIA GeForce RTX 3060", "vram_gb": 12.0}
    e24 = estimate(resolve_config({}, "sdxl-lora-24gb", need_inputs=False), "sdxl", gpu)
    e8 = estimate(resolve_config({}, "sdxl-lora-8gb", need_inputs=False), "sdxl", gpu)
    assert e8["vram_gb"] < 8 < e24["vram_gb"] and not e24["fits"] and e8["fits"]
    msg, fix = oom_advice(resolve_config({}, "sdxl-lora-12gb", need_inputs=False), "sdxl")
    assert "out of memory" in msg and "sdxl-lora-8gb" in fix


# ---- training --------------------------------------------------------------------------------

def _eval_losses(run: Path) -> tuple[float, float]:
    ev = events_of(run)
    start = next(e for e in ev if e["type"] == "start")
    done = next(e for e in ev if e["type"] == "done")
    return start["eval_loss"], done["eval_loss"]


def test_lora_sd1_learns_and_the_file_reproduces_the_unet_in_diffusers(dataset, tiny_sd1, tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import inject_adapter_in_model
    from safetensors import safe_open
    from safetensors.torch import load_file

    from studio.train.checkpoint import latest_checkpoint
    from studio.train.engine import peft_config, train

    run = tmp_path / "run"
    cfg = cfg_for(tiny_sd1, dataset, run, max_train_steps=16, save_every_n_steps=8, sample_every_n_steps=16,
                  sample_prompts=["sks dog"], sample_steps=2)
    out = train(cfg)
    first, last = _eval_losses(run)
    assert last < first * 0.97, (first, last)

    ev = events_of(run)
    types = [e["type"] for e in ev]
    assert types.count("start") == 1 and types.count("done") == 1 and types.count("step") == 16
    step = next(e for e in ev if e["type"] == "step")
    assert {"step", "loss", "lr", "it_per_s"} <= set(step) and "rss_peak_mb" in step
    sample = next(e for e in ev if e["type"] == "sample")
    assert all(Path(p).is_file() for p in sample["paths"]) and len(sample["paths"]) == 1
    assert any(e["type"] == "checkpoint" for e in ev)
    assert json.loads((run / "config.json").read_text())["rank"] == 4

    with safe_open(str(out), "pt") as fh:
        meta = fh.metadata()
        keys = list(fh.keys())
    assert meta["ss_steps"] == "16" and meta["ss_network_dim"] == "4" and meta["ss_resolution"] == "(32, 32)"
    assert json.loads(meta["ss_tag_frequency"]) == {"2_sks dog": {"sks dog": 4, "red": 2, "green": 1, "blue": 1,
                                                                  "photo": 4}}
    assert json.loads(meta["ss_dataset_dirs"])["2_sks dog"] == {"n_repeats": 2, "img_count": 4}
    assert meta["ss_sd_model_name"] == tiny_sd1.name and len(meta["ss_sd_model_hash"]) == 8
    assert "modelspec.architecture" in meta and meta["ss_learning_rate"] == "0.003"
    assert any(k.startswith("lora_unet_") and k.endswith("lora_down.weight") for k in keys)

    # the trained UNet, rebuilt from the last checkpoint's tensors
    trained = StableDiffusionPipeline.from_pretrained(tiny_sd1, safety_checker=None, requires_safety_checker=False)
    inject_adapter_in_model(peft_config(cfg, "unet"), trained.unet, adapter_name="default")
    state = load_file(str(latest_checkpoint(run) / "trainable.safetensors"))
    params = dict(trained.unet.named_parameters())
    with torch.no_grad():
        for k, v in state.items():
            params[k[len("unet."):]].copy_(v)
    # the file, loaded by diffusers' own webUI-LoRA loader
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(out))
    g = torch.Generator().manual_seed(0)
    x, h = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        ref = trained.unet(x, 500, h).sample
        got = pipe.unet(x, 500, h).sample
        base = StableDiffusionPipeline.from_pretrained(tiny_sd1, safety_checker=None).unet(x, 500, h).sample
    assert (ref - base).abs().max() > 1e-3  # the adapter changes the output...
    assert (got - ref).abs().max() <= 1e-4  # ...and diffusers reproduces it from the file


@pytest.mark.parametrize("family,method", [("sd1", "locon"), ("sd1", "loha"), ("sd1", "lokr"), ("sd1", "dora"),
                                           ("sdxl", "lora"), ("sdxl", "locon"), ("sdxl", "loha"), ("sdxl", "lokr"),
                                           ("sdxl", "dora")])
def test_every_method_trains_on_sd1_and_sdxl(family, method, dataset, tiny_sd1, tiny_sdxl, tmp_path):
    from studio.adapters import load_adapter
    from studio.train.engine import train

    model = tiny_sd1 if family == "sd1" else tiny_sdxl
    run = tmp_path / "run"
    extra = {"train_text_encoder": True, "text_encoder_lr": 1e-3} if method == "lora" else {}
    if method in ("loha", "lokr"):  # Hadamard / Kronecker products start slower: the usual higher lr
        extra["learning_rate"] = 2e-2
    out = train(cfg_for(model, dataset, run, method=method, max_train_steps=8, **extra))
    first, last = _eval_losses(run)
    assert last < first, (method, first, last)
    adapter = load_adapter(out)
    names = list(adapter.modules)
    assert names and adapter.family == family
    assert adapter.kind == {"lora": "lora", "locon": "locon", "loha": "loha", "lokr": "lokr", "dora": "dora"}[method]
    if method == "locon":  # conv layers of the resnets are adapted too
        assert any("resnets" in n or "in_layers" in n or "out_layers" in n or "skip" in n for n in names)
    if method == "lora":  # text encoders trained too: SDXL has te1 and te2
        assert adapter.parts()["te1"] > 0 and adapter.parts()["te2"] > 0


# ---- resume, kill, cancel ------------------------------------------------------------------

def _all_files_sound(run: Path) -> None:
    """Every non-hidden file in the run folder is complete and parses."""
    from safetensors.torch import load_file

    from studio.train.checkpoint import load_checkpoint

    for p in run.rglob("*"):
        if any(part.startswith(".") for part in p.relative_to(run).parts) or not p.is_file():
            continue
        if p.suffix == ".safetensors":
            load_file(str(p))
        elif p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".jsonl":
            for line in p.read_bytes().splitlines():
                json.loads(line)  # whole lines only
    for ck in (run / "checkpoints").glob("step-*"):
        load_checkpoint(ck)


def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(dataset, tiny_sd1, tmp_path):
    from safetensors.torch import load_file

    from studio.train import runner
    from studio.train.engine import train

    steps = 14
    common = dict(max_train_steps=steps, save_every_n_steps=2, noise_offset=0.05, min_snr_gamma=5,
                  caption_dropout=0.2, lr_scheduler="cosine", lr_warmup_steps=2)
    ref = train(cfg_for(tiny_sd1, dataset, tmp_path / "ref", **common))

    cfg = cfg_for(tiny_sd1, dataset, tmp_path / "killed", **common).to_dict()
    handle = runner.start_run(cfg, extra_env={"OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline:
        done = [e for e in events_of(handle.run_dir) if e["type"] == "step"]
        if done and done[-1]["step"] >= 5:
            break
        assert handle.alive(), handle.log_path.read_text()[-2000:]
        time.sleep(0.05)
    handle.proc.kill()  # SIGKILL
    handle.wait(30)
    killed_at = max(e["step"] for e in events_of(handle.run_dir) if e["type"] == "step")
    assert killed_at < steps
    _all_files_sound(handle.run_dir)
    assert runner.read_status(handle.run_dir).state == "interrupted"

    resumed = runner.start_run(resume=handle.run_dir, extra_env={"OMP_NUM_THREADS": "1"})
    assert resumed.wait(180) == 0, resumed.log_path.read_text()[-3000:]
    _all_files_sound(handle.run_dir)
    status = runner.read_status(handle.run_dir)
    assert status.state == "done" and status.step == steps
    a, b = load_file(str(ref)), load_file(status.output)
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= 1e-5, worst
    assert not list(handle.run_dir.rglob(".tmp-*"))


def test_sigterm_saves_checkpoint_and_adapter_then_exits_cleanly(dataset, tiny_sd1, tmp_path):
    from studio.jobs import GPU
    from studio.train import runner

    cfg = cfg_for(tiny_sd1, dataset, tmp_path / "cancel", max_train_steps=500).to_dict()
    handle = runner.start_run(cfg, extra_env={"OMP_NUM_THREADS": "1"})
    assert GPU.status()["kind"] == "train"
    deadline = time.time() + 120
    while not any(e["type"] == "step" for e in events_of(handle.run_dir)):
        assert time.time() < deadline and handle.alive(), handle.log_path.read_text()[-2000:]
        time.sleep(0.05)
    runner.cancel_run(handle)
    assert handle.wait(60) == 0, handle.log_path.read_text()[-2000:]
    status = runner.read_status(handle.run_dir)
    assert status.state == "cancelled" and 0 < status.step < 500
    assert Path(status.output).is_file() and status.checkpoints
    assert int(Path(status.checkpoints[-1]).name.split("-")[1]) == status.step
    time.sleep(0.2)
    assert not GPU.status()["busy"]  # the gate is released when the process ends
    assert any(r.run_dir == handle.run_dir for r in runner.list_runs(tmp_path))


# ---- caching ------------------------------------------------------------------------------------

def test_latent_cache_vae_encoder_not_called_after_first_epoch(dataset, tiny_sd1, tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    from studio.train.engine import train

    calls = []
    real = AutoencoderKL.encode

    def counting(self, x, *a, **k):
        calls.append(x.shape[0])
        return real(self, x, *a, **k)

    monkeypatch.setattr(AutoencoderKL, "encode", counting)
    monkeypatch.setenv("STUDIO_CACHE_DIR", str(tmp_path / "cache"))
    # 4 images x 2 repeats, batch 2 -> 4 steps per epoch; 10 steps = 2.5 epochs
    train(cfg_for(tiny_sd1, dataset, tmp_path / "a", max_train_steps=10))
    assert sum(calls) == 4  # each image encoded once (before / in the first epoch), never again
    ev = events_of(tmp_path / "a")
    assert max(e["epoch"] for e in ev if e["type"] == "step") >= 2

    calls.clear()  # a second run on the same images and VAE reuses the disk cache
    train(cfg_for(tiny_sd1, dataset, tmp_path / "b", max_train_steps=4))
    assert sum(calls) == 0
    assert list((tmp_path / "cache" / "latents").rglob("*.safetensors"))

    calls.clear()  # the counter does see encodes: without caching every step encodes its batch
    train(cfg_for(tiny_sd1, dataset, tmp_path / "c", max_train_steps=4, cache_latents=False))
    assert sum(calls) >= 4 * 2 - 1


# ---- accelerate ---------------------------------------------------------------------------------

def test_accelerate_launch_two_processes_writes_one_output(dataset, tiny_sd1, tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    cfg_file = tmp_path / "cfg.json"
    run = tmp_path / "ddp"
    cfg_file.write_text(json.dumps(cfg_for(tiny_sd1, dataset, run, max_train_steps=4, batch_size=1).to_dict()))
    # accelerate 1.15 runs `launch --cpu --num_processes 2` as ONE process unless given an mpirun hostfile;
    # `--multi_gpu` on a CPU-only machine starts 2 torchrun workers that train data-parallel over gloo.
    proc = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "studio", "train",
                           str(cfg_file), "--no-progress"],
                          cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outputs = [p for p in run.iterdir() if p.suffix == ".safetensors"]
    assert len(outputs) == 1
    ev = events_of(run)
    types = [e["type"] for e in ev]
    assert types.count("start") == 1 and types.count("done") == 1 and types.count("step") == 4
    assert next(e for e in ev if e["type"] == "start")["processes"] == 2


@pytest.mark.parametrize("family,expected", [("sd1", {"unet": 192, "text_encoder": 72}),
                                             ("sdxl", {"unet": 722, "text_encoder": 72, "text_encoder_2": 192})])
def test_default_lora_targets_are_kohyas_on_real_shaped_models(family, expected):
    """The modules a LoRA run adapts, matched by peft's own rule on real SD1.5 / SDXL shapes (meta
    tensors): kohya's default set (every Linear of the Transformer2DModels, every CLIP attention and
    MLP linear), so files match what users know from other trainers."""
    from diffusers import UNet2DConditionModel
    from peft.tuners.tuners_utils import check_target_module_exists
    from transformers import CLIPTextConfig, CLIPTextModel

    from studio.models.loader import CONFIG_ROOT
    from studio.train.engine import peft_config

    def cfg(part):
        return json.loads((CONFIG_ROOT / family / part / "config.json").read_text())

    with torch.device("meta"):
        models = {"unet": UNet2DConditionModel.from_config(cfg("unet")),
                  "text_encoder": CLIPTextModel(CLIPTextConfig(**cfg("text_encoder")))}
        if family == "sdxl":
            models["text_encoder_2"] = CLIPTextModel(CLIPTextConfig(**cfg("text_encoder_2")))
    run = resolve_config(dict(base_model="tiny:sd1", dataset=".", output_dir=".", method="lora"))
    got = {}
    for name, model in models.items():
        pc = peft_config(run, "unet" if name == "unet" else "text_encoder")
        got[name] = sum(1 for key, m in model.named_modules()
                        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and check_target_module_exists(pc, key))
    assert got == expected


def test_a_full_disk_stops_the_run_with_a_plain_message_and_keeps_the_last_checkpoint(dataset, tiny_sd1, tmp_path,
                                                                                     monkeypatch):
    import errno

    from studio.train import checkpoint as ckpt
    from studio.train.engine import train

    real_save = ckpt.save_checkpoint
    calls = {"n": 0}

    def save_then_fill_the_disk(run_dir, step, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint does not fit
            raise OSError(errno.ENOSPC, "No space left on device", str(run_dir / "checkpoints"))
        return real_save(run_dir, step, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_fill_the_disk)
    run = tmp_path / "full"
    with pytest.raises(StudioError, match="The disk is full") as err:
        train(cfg_for(tiny_sd1, dataset, run, max_train_steps=6, save_every_n_steps=2))
    assert "Resume" in str(err.value) and "Traceback" not in str(err.value)
    (event,) = [e for e in events_of(run) if e["type"] == "error"]
    assert event["message"].startswith("The disk is full") and "checkpoint is intact" in event["fix"]
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-000002"]  # the complete one, still there
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(run))["state"]["step"] == 2
