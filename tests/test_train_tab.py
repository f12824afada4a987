"""Train tab: the steps line, form -> config, and real runs of the tiny SD1 model driven through the
tab's own handlers: start, loss events feeding the plot, a preview image, a fresh page load showing
the same run, a second start queued, cancel saving a loadable adapter, resume to the end, a queued
run starting when the GPU frees, and a bad dataset turning into a readable message.

Runs are tiny (64 px, rank 4, a few steps, one CPU thread each).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from studio.errors import StudioError
from ui import train_tab as T


@pytest.fixture
def ctx(tiny_dir, monkeypatch):
    from studio.places import Settings, Workspace
    from ui.context import AppContext

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the training processes inherit it
    settings = Settings.load()
    settings.models_dirs = [str(tiny_dir)]  # the tiny model is a path: it must be in the studio's folders
    return AppContext(settings=settings, workspace=Workspace(settings.workspace_path()).ensure(),
                      models_dirs=[str(tiny_dir)])


def _images(folder: Path, n: int, seed: int = 0, wide: bool = True) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = (96, 64) if wide and i == n - 1 else (64, 64)
        base = np.zeros((h, w, 3), np.float32)
        base[..., i % 3] = 200
        Image.fromarray(np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype("uint8")).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"sks dog, {['red', 'green', 'blue'][i % 3]}")


@pytest.fixture(autouse=True)
def _no_leftover_runs():
    """A failing test must not leave a training process (or a queued run) behind."""
    yield
    from studio.train import runner
    from studio.train.queue import QUEUE

    for run_dir in QUEUE.pending():
        QUEUE.cancel(run_dir)
    for handle in list(runner._LIVE.values()):
        if handle.alive():
            handle.proc.kill()
            handle.wait(30)


@pytest.fixture
def dataset(ctx) -> Path:
    """4 images (one wide) x 2 repeats, inside the workspace."""
    root = ctx.workspace.datasets / "dogs"
    if not root.exists():
        _images(root / "2_sks dog", 4)
    return root


def form(tiny, dataset, **kw) -> dict:
    values = dict(base_model=str(tiny), dataset=str(dataset), preset="", epochs=0, method="lora", resolution=64,
                  batch_size=2, max_train_steps=10, rank=4, alpha=4, learning_rate=3e-3, seed=3,
                  gradient_checkpointing=False, save_dtype="fp32", sample_every_n_steps=0, save_every_n_steps=0,
                  sample_prompts="", sample_steps=2, output_name="tabtest")
    values.update(kw)
    return values


def wait_for(ctx, run_dir, pred, timeout=150, what="condition"):
    from studio.train import runner

    deadline = time.time() + timeout
    while True:
        s = T.run_state(ctx, run_dir)
        if pred(s):
            return s
        handle = runner._LIVE.get(str(run_dir))
        log = handle.log_path.read_text()[-3000:] if handle and handle.log_path.exists() else ""
        assert time.time() < deadline, f"timed out waiting for {what}; state {s['state']}\n{log}"
        time.sleep(0.2)


def wait_gpu_free(timeout=30):
    from studio.jobs import GPU

    deadline = time.time() + timeout
    while GPU.status()["busy"]:
        assert time.time() < deadline, GPU.status()
        time.sleep(0.05)


# ---- the plan: steps line and config -------------------------------------------------------------

def test_steps_line_reads_images_repeats_epochs_batch(ctx, dataset):
    line = T.steps_line(ctx, str(dataset), 2, 1, 8, 0, 64)
    assert "4 images x 2 repeats x 8 epochs / batch 2 = 32 steps" in line
    line = T.steps_line(ctx, str(dataset), 2, 1, 0, 10, 64)  # from Max steps: the epochs are derived
    assert "4 images x 2 repeats x 2.5 epochs / batch 2 = 10 steps" in line and "partial" in line
    line = T.steps_line(ctx, str(dataset), 1, 2, 3, 0, 64)
    assert "x 3 epochs / batch 1 / accumulation 2 = 12 steps" in line
    # the count is the engine's own, buckets included: the wide image gets a bucket of its own
    # (6 + 2 image-repeats in batches of 4 -> 2 + 1 steps per epoch, not 8 / 4 = 2)
    from studio.train.config import resolve_config
    from studio.train.data import BatchOrder, build_entries
    from studio.train.plan import plan_steps

    kw = dict(resolution=128, bucket_step=32, min_bucket_side=64)
    plan = plan_steps(dataset, 4, 1, 1, **kw)
    entries, _ = build_entries(resolve_config({"base_model": "x", "dataset": str(dataset), **kw}))
    assert len({e.bucket for e in entries}) == 2
    assert plan.steps_per_epoch == BatchOrder(entries, 4, seed=0).steps_per_epoch() == 3
    assert plan.line.endswith("= 3 steps") and "bucket" in plan.notes[0]
    mixed = ctx.workspace.datasets / "mixed"
    _images(mixed / "3_cat", 1, wide=False)
    _images(mixed / "1_dog", 2, seed=1, wide=False)
    assert "3 images (5 with their folders' repeats) x 1 epochs / batch 1 = 5 steps" in \
        T.steps_line(ctx, str(mixed), 1, 1, 1, 0, 64)
    assert "outside" in T.steps_line(ctx, "/etc", 1, 1, 1, 0, 64)  # a browser path outside the studio
    (ctx.workspace.datasets / "empty").mkdir(exist_ok=True)
    assert "no usable images" in T.steps_line(ctx, str(ctx.workspace.datasets / "empty"), 1, 1, 1, 0, 64)


def test_form_to_config_epochs_extra_and_duplicate(ctx, dataset, tiny_sd1):
    from studio.train.config import resolve_config
    from studio.train.plan import config_to_form, form_to_config, preset_values

    cfg = form_to_config(form(tiny_sd1, dataset, epochs=8, sample_prompts="a dog\n\nsks dog on grass",
                              resolution="64"), extra="conv_rank=2\n# a comment\n")
    assert cfg["max_train_steps"] == 32 and cfg["sample_prompts"] == ["a dog", "sks dog on grass"]
    assert cfg["resolution"] == 64 and cfg["conv_rank"] == "2"
    resolved = resolve_config(cfg)
    assert (resolved.max_train_steps, resolved.conv_rank, resolved.rank) == (32, 2, 4)
    back = config_to_form(resolved.to_dict())
    assert back["sample_prompts"] == "a dog\nsks dog on grass" and back["output_name"] == "tabtest-copy"
    assert back["dataset"] == str(dataset) and back["rank"] == 4 and back["max_train_steps"] == 32
    # a preset fills the form; its keys the form does not show still apply
    p = preset_values("sdxl-lora-8gb")
    assert p["resolution"] == 1024 and p["optimizer"] == "adafactor"
    with_preset = resolve_config(form_to_config({"preset": "sdxl-lora-8gb", "rank": 8}), need_inputs=False)
    assert with_preset.rank == 8 and with_preset.fp8_base == resolve_config({}, "sdxl-lora-8gb", need_inputs=False).fp8_base
    # the engine's validation speaks, naming the key
    with pytest.raises(StudioError, match="'learnig_rate'"):
        T.start(ctx, form(tiny_sd1, dataset), extra="learnig_rate=1e-4")
    with pytest.raises(StudioError, match="not key=value"):
        T.start(ctx, form(tiny_sd1, dataset), extra="rank")
    with pytest.raises(StudioError, match="outside"):
        T.start(ctx, form(tiny_sd1, "/etc"))
    with pytest.raises(StudioError, match="outside"):  # 'Other settings' cannot smuggle a path in either
        T.start(ctx, form(tiny_sd1, dataset), extra="dataset=/etc")
    with pytest.raises(StudioError, match="No dataset"):
        T.start(ctx, form(tiny_sd1, ""))


def test_view_of_a_run_folder_shows_error_with_fix_and_history(ctx):
    """An out-of-memory run, written as the engine writes it: the plot, the message and the fix."""
    from studio.train.events import EventWriter

    run = ctx.workspace.runs / "oom-run"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"method": "lora", "max_train_steps": 100, "output_name": "x"}))
    with EventWriter(run / "events.jsonl") as w:
        w.emit("start", step=0, max_train_steps=100, method="lora", family="sd1")
        for i, loss in enumerate([0.5, 0.3, 0.4], 1):
            w.emit("step", step=i, loss=loss, lr=1e-4, it_per_s=2.0, vram_mb=5000, vram_peak_mb=6144)
        w.emit("error", message="The GPU ran out of memory (this config needs about 9.1 GB).",
               fix="start from the preset 'sd15-lora-6gb'")
    s = T.run_state(ctx, str(run))
    assert s["state"] == "error"
    assert "ran out of memory" in s["status"] and "What to do: start from the preset 'sd15-lora-6gb'" in s["status"]
    assert "VRAM 4.9 GB (peak 6.0 GB)" in s["status"] and "learning rate 1.00e-04" in s["status"]
    raw = [(r["step"], r["loss"]) for r in s["plot"] if r["series"] == "raw"]
    smooth = [r["loss"] for r in s["plot"] if r["series"] == "smoothed"]
    assert raw == [(1, 0.5), (2, 0.3), (3, 0.4)]
    assert smooth[0] == pytest.approx(0.5) and 0.3 < smooth[2] < 0.5  # an average, debiased at the start
    row = next(r for r in T.history(ctx) if r[0] == "oom-run")
    assert row[1] == "error" and row[3] == "3/100" and row[4] == round(smooth[-1], 4)
    with pytest.raises(StudioError, match="outside"):
        T.run_state(ctx, "/etc")


# ---- real runs ------------------------------------------------------------------------------------

def test_start_watch_fresh_page_queue_cancel_resume(ctx, dataset, tiny_sd1):
    from studio.adapters import load_adapter
    from studio.jobs import GPU
    from studio.train.events import read_events
    from studio.train.queue import QUEUE

    wait_gpu_free()
    run_dir, msg = T.start(ctx, form(tiny_sd1, dataset, max_train_steps=400, sample_every_n_steps=3,
                                     sample_prompts="sks dog"))
    assert msg.startswith("Started") and Path(run_dir).parent == ctx.workspace.runs
    assert GPU.status()["kind"] == "train"

    # loss events arrive and feed the plot; a preview image appears, labelled by its step
    s = wait_for(ctx, run_dir, lambda s: s["gallery"] and s["step"] >= 4, what="a preview image")
    assert s["state"] == "running" and "Training" in s["status"] and ("it/s" in s["status"] or "s/it" in s["status"])
    assert "ETA" in s["status"] and "loss" in s["status"] and "learning rate" in s["status"]
    events = {e["step"]: e["loss"] for e in read_events(Path(run_dir) / "events.jsonl") if e["type"] == "step"}
    raw = {r["step"]: r["loss"] for r in s["plot"] if r["series"] == "raw"}
    assert raw and all(events[k] == v for k, v in raw.items()) and len(raw) >= 4
    assert {r["series"] for r in s["plot"]} == {"raw", "smoothed"}
    image, label = s["gallery"][-1]
    assert Path(image).is_file() and Path(image).parent == Path(run_dir) / "samples" and label == "step 3"

    # a fresh page load (no session state) shows the same run, live
    fresh = T.run_state(ctx, None)
    assert fresh["run_dir"] == run_dir and fresh["state"] == "running" and fresh["step"] >= s["step"]
    fresh_raw = {r["step"]: r["loss"] for r in fresh["plot"] if r["series"] == "raw"}
    assert raw.items() <= fresh_raw.items()

    # a second start while this one trains is queued, shown as such, and can be taken off the queue
    second, msg2 = T.start(ctx, form(tiny_sd1, dataset, output_name="second"))
    assert "queued (1st in line)" in msg2 and QUEUE.position(second) == 1
    q = T.run_state(ctx, second)
    assert q["state"] == "queued" and "1st in line" in q["status"]
    assert "GPU busy" in T._gpu_line() and "1 run(s) queued" in T._gpu_line()
    assert "off the queue" in T.cancel(ctx, second)
    assert not Path(second).exists() and QUEUE.position(second) == 0

    # cancel keeps what was trained: an adapter file that loads
    assert "Stopping" in T.cancel(ctx, run_dir)
    s = wait_for(ctx, run_dir, lambda s: s["state"] == "cancelled", what="the cancel")
    stopped_at = s["step"]
    assert 0 < stopped_at < 400 and s["output"] and "Cancelled" in s["status"]
    adapter = load_adapter(s["output"])
    assert adapter.kind == "lora" and adapter.modules and adapter.family == "sd1"

    # resume completes, up to the new max steps
    wait_gpu_free()
    target = stopped_at + 3
    assert "Resuming" in T.resume(ctx, run_dir, target)
    s = wait_for(ctx, run_dir, lambda s: s["state"] == "done", what="the resumed run to finish")
    assert s["step"] == target and Path(s["output"]).is_file()
    assert sorted(r["step"] for r in s["plot"] if r["series"] == "raw") == list(range(1, target + 1))
    with pytest.raises(StudioError, match="already finished"):
        T.resume(ctx, run_dir, target)
    row = next(r for r in T.history(ctx) if r[0] == Path(run_dir).name)
    assert row[1] == "done" and row[3] == f"{target}/{target}" and isinstance(row[4], float)
    assert row[5] != "-" and row[6] == s["output"]
    assert T.output_of(ctx, run_dir) == s["output"]
    dup = T.duplicate(ctx, run_dir)
    assert dup["sample_prompts"] == "sks dog" and dup["output_name"] == "tabtest-copy"


def test_queued_run_starts_when_the_gpu_frees(ctx, dataset, tiny_sd1):
    from studio.jobs import GPU

    wait_gpu_free()
    held = GPU.acquire("generate", "someone's images", wait=False)
    try:
        run_dir, msg = T.start(ctx, form(tiny_sd1, dataset, max_train_steps=3, output_name="waits"))
        assert "queued" in msg and "GPU busy: generate" in msg
        time.sleep(0.3)
        assert T.run_state(ctx, run_dir)["state"] == "queued"
        assert not (Path(run_dir) / "events.jsonl").exists()  # it did not start
    finally:
        GPU.release(held)
    s = wait_for(ctx, run_dir, lambda s: s["state"] == "done", what="the queued run to run")
    assert s["step"] == 3 and Path(s["output"]).is_file()


def test_bad_dataset_is_a_readable_message_with_the_fix(ctx, tiny_sd1):
    empty = ctx.workspace.datasets / "nothing-here"
    empty.mkdir(parents=True, exist_ok=True)
    (empty / "notes.txt").write_text("no images")
    wait_gpu_free()
    run_dir, _ = T.start(ctx, form(tiny_sd1, empty, output_name="bad"))
    s = wait_for(ctx, run_dir, lambda s: s["state"] == "error", timeout=120, what="the error")
    assert "no usable images" in s["status"] and "What to do:" in s["status"] and "Traceback" not in s["status"]


def test_tab_builds_with_stable_labels_and_opens_results_in_other_tabs(ctx):
    """The whole app builds; the key controls carry the labels the browser test uses, and the
    'Open in Inspect / Generate' buttons write into those tabs' inputs and switch tabs."""
    import app
    from ui.train_tab import _find

    demo = app.build_app(ctx)
    train = next(t for t in ctx.tabs.children if t.id == "train")
    for label in ["Dataset", "Method", "Preset", "Resolution", "Max steps", "Sample every N steps",
                  "Save every N steps", "Loss", "Preview images", "Log"]:
        assert _find(train, label) is not None, label
    buttons = {getattr(b, "value", None): b for b in _walk(train) if type(b).__name__ == "Button"}
    assert {"Start training", "Cancel", "Resume", "Duplicate config", "Open in Inspect", "Open in Generate"} <= set(buttons)
    assert any(type(b).__name__ == "Timer" for b in _walk(train))
    generate = next(t for t in ctx.tabs.children if t.id == "generate")
    adapter = _find(generate, "Adapter 1")

    def outputs_of(button):
        return [o for fn in demo.fns.values() for t in fn.targets if t[0] == button._id for o in fn.outputs]

    assert ctx.components["inspect_path"] in outputs_of(buttons["Open in Inspect"])
    assert ctx.tabs in outputs_of(buttons["Open in Inspect"])
    assert adapter is not None and adapter in outputs_of(buttons["Open in Generate"])


def _walk(block):
    for child in getattr(block, "children", []) or []:
        yield child
        yield from _walk(child)


def test_opening_the_train_tab_lists_a_dataset_added_meanwhile():
    import app

    ctx = app.make_context(app.parse_args([]))
    demo = app.build_app(ctx)
    tab = ctx.components["tab:train"]
    (fn,) = [f.fn for f in demo.fns.values() if (tab._id, "select") in [tuple(t) for t in f.targets]]
    new = ctx.workspace.datasets / "added-later"
    (new / "1_cat").mkdir(parents=True)
    update = fn()
    assert any("added-later" in str(c) for c in update["choices"])
