"""The Train tab: set up a run, start it, watch it live, cancel / resume / duplicate it, list past runs.

Thin by design: the arithmetic and the config live in ``studio.train.plan``, starting and queueing
in ``studio.train.queue`` / ``runner``, and everything shown about a run is read from its folder by
``studio.train.monitor`` — a timer polls it, so a refreshed or second browser sees the same run.
The handlers are plain module functions so tests can call them without a browser.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from studio.errors import StudioError
from studio.train.plan import FORM_KEYS, METHOD_HELP, METHODS

POLL_S = 1.5
RESOLUTIONS = [64, 256, 512, 640, 768, 1024]
# The form's inputs, in the order the handlers receive them (FORM_KEYS are config keys).
INPUT_KEYS = ["base_model", "dataset", "preset", "epochs", *FORM_KEYS]
HISTORY_HEADERS = ["run", "state", "method", "steps", "final loss", "duration", "output"]
STATE_WORDS = {"running": "Training", "starting": "Starting", "queued": "Queued", "done": "Finished",
               "cancelled": "Cancelled (the adapter so far is saved)", "error": "Stopped with an error",
               "interrupted": "Interrupted (the process ended without finishing; Resume continues it)",
               "new": "Not started"}


def _error_md(err: StudioError) -> str:
    return f"**{err.message}**" + (f"\n\nWhat to do: {err.fix}" if err.fix else "")


def _run_dir(ctx, run_dir) -> Path:
    """A run folder named by the browser: must be inside the studio's folders and hold a run."""
    if not run_dir:
        raise StudioError("No run selected.", "Start a run, or pick one in the runs list.")
    path = ctx.safe_path(run_dir, must_exist=True)
    if not (path / "config.json").is_file():
        raise StudioError(f"{path.name} is not a run folder.", "Pick a run from the runs list.")
    return path


def _gpu_line() -> str:
    from studio.jobs import GPU
    from studio.train.queue import QUEUE

    s = GPU.status()
    waiting = len(QUEUE.pending())
    queued = f" · {waiting} run(s) queued" if waiting else ""
    return (f"GPU busy: {s['current']}{queued}." if s["busy"] else "GPU free.") + (
        "" if s["busy"] or not waiting else " (the next queued run starts now)")


# --- handlers (plain functions) ---------------------------------------------------------------------

def dataset_choices(workspace) -> list[str]:
    from studio.dataset.importer import list_datasets

    return [str(p) for p in list_datasets(workspace)]


def steps_line(ctx, dataset, batch_size, accumulation, epochs, max_steps, resolution, enable_buckets=True) -> str:
    """'20 images x 10 repeats x 8 epochs / batch 2 = 800 steps', or why it cannot be counted."""
    from studio.train.plan import plan_steps

    if not dataset:
        return "Choose a dataset to see how many steps this makes."
    try:
        p = plan_steps(ctx.safe_path(dataset, must_exist=True), int(batch_size or 1), int(accumulation or 1),
                       float(epochs or 0), int(max_steps or 0), int(resolution or 512), bool(enable_buckets))
    except StudioError as err:
        return _error_md(err)
    except (TypeError, ValueError):
        return "Batch size, steps and epochs must be numbers."
    return f"**{p.line}**" + "".join(f"\n\n{n}" for n in p.notes)


def estimate_line(values: dict) -> str:
    """VRAM / time estimate for the form (a model, not a measurement)."""
    from studio.train.config import resolve_config
    from studio.train.estimate import estimate
    from studio.train.plan import form_to_config

    try:
        cfg = resolve_config(form_to_config({**values, "epochs": 0}), need_inputs=False)
        e = estimate(cfg)
    except Exception:  # an unfinished form: no estimate yet
        return ""
    if e["gpu"] == "cpu":
        return f"Estimated VRAM on a GPU: about {e['vram_gb']} GB (no GPU found: this machine trains on the CPU, slowly)."
    fits = "fits" if e["fits"] else "**does not fit**: choose a smaller preset or lower the resolution / batch"
    return (f"Estimated: about {e['vram_gb']} GB of VRAM ({fits} on {e['gpu']}, {e['gpu_vram_gb']} GB); "
            f"about {e['total_minutes']} min.")


def start(ctx, values: dict, extra: str = "") -> tuple[str, str]:
    """Start (or queue) a run from the form. Returns (run folder, message); raises StudioError."""
    from studio.train.plan import form_to_config
    from studio.train.queue import QUEUE

    values = dict(values)
    if not values.get("base_model"):
        raise StudioError("No base model chosen.", "Pick one in 'Base model' at the top of the page.")
    if not values.get("dataset"):
        raise StudioError("No dataset chosen.", "Pick a dataset (bring images in on the Dataset tab first).")
    values["dataset"] = str(ctx.safe_path(values["dataset"], must_exist=True))
    config = form_to_config(values, extra)
    # Paths from the browser (the form or 'Other settings') must stay inside the studio's folders.
    config["dataset"] = str(ctx.safe_path(config["dataset"], must_exist=True))
    if _looks_like_path(config.get("base_model", "")):
        config["base_model"] = str(ctx.safe_path(config["base_model"], must_exist=True))
    if config.get("output_dir"):
        config["output_dir"] = str(ctx.safe_path(config["output_dir"]))
    else:
        config["output_dir"] = str(_fresh_run_dir(ctx, config.get("output_name") or "adapter"))
    sub = QUEUE.submit(config)
    if sub.queued:
        return str(sub.run_dir), (f"**{sub.run_dir.name}** is queued ({_ordinal(sub.position)} in line). It starts by "
                                  f"itself when the GPU is free. {_gpu_line()}")
    return str(sub.run_dir), f"Started **{sub.run_dir.name}**."


def _looks_like_path(spec: str) -> bool:
    """A model spec naming a local file or folder (not 'tiny:sd1' or a hub id 'owner/name')."""
    if not spec or spec.startswith("tiny:"):
        return False
    p = Path(spec).expanduser()
    return p.is_absolute() or spec.startswith((".", "~")) or p.exists()


def _fresh_run_dir(ctx, name: str) -> Path:
    import time

    base = ctx.workspace.runs / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 2
    while path.exists():
        path, n = base.with_name(f"{base.name}-{n}"), n + 1
    return path


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def cancel(ctx, run_dir) -> str:
    """Stop a run (it saves a checkpoint and the adapter so far), or take a queued run off the queue."""
    from studio.train import runner
    from studio.train.monitor import watch
    from studio.train.queue import QUEUE

    path = _run_dir(ctx, run_dir)
    if QUEUE.cancel(path):
        return f"Took **{path.name}** off the queue; it never started."
    view = watch(path)
    if view.state not in ("running", "starting"):
        return f"**{path.name}** is not running ({STATE_WORDS.get(view.state, view.state).lower()})."
    if view.state == "starting":  # still loading: a signal now would end it before it can save anything
        from studio.train.engine import CANCEL_FILE

        (path / CANCEL_FILE).write_text("cancel requested\n")
        return f"**{path.name}** is still loading; it stops after its first step and saves that."
    runner.cancel_run(path)
    return f"Stopping **{path.name}**: it saves a checkpoint and the adapter trained so far, then ends."


def resume(ctx, run_dir, max_steps=None) -> str:
    """Continue a cancelled / interrupted run from its last checkpoint (queued if the GPU is busy), up
    to ``max_steps`` (the form's 'Max steps') when given, else to the run's own step count."""
    from studio.train.monitor import watch
    from studio.train.queue import QUEUE

    path = _run_dir(ctx, run_dir)
    view = watch(path)
    if view.state in ("running", "starting", "queued"):
        raise StudioError(f"{path.name} is already {view.state}.", "Wait for it, or cancel it first.")
    if not (path / "checkpoints").is_dir() or not any((path / "checkpoints").glob("step-*")):
        raise StudioError(f"{path.name} has no checkpoint to resume from.",
                          "Runs save a checkpoint when cancelled and every 'Save every N steps'; start it again instead.")
    sets = {}
    target = int(max_steps or 0)
    if target and target != view.max_steps:
        if target <= view.step:
            raise StudioError(f"{path.name} has already trained {view.step} steps, not fewer than 'Max steps' ({target}).",
                              f"Set 'Max steps' above {view.step} to train it further, then Resume.")
        sets["max_train_steps"] = target
    elif view.state == "done":
        raise StudioError(f"{path.name} already finished its {view.max_steps} steps.",
                          "Raise 'Max steps' above that number to train it further, then Resume.")
    sub = QUEUE.submit(resume=path, sets=sets)
    goal = sets.get("max_train_steps", view.max_steps)
    if sub.queued:
        return f"**{path.name}** is queued to resume ({_ordinal(sub.position)} in line), up to step {goal}."
    return f"Resuming **{path.name}** from step {view.step} up to step {goal}."


def duplicate(ctx, run_dir) -> dict:
    """The form values of a run's config (a fresh output name), to start a similar run."""
    import json

    from studio.train.plan import config_to_form

    path = _run_dir(ctx, run_dir)
    return config_to_form(json.loads((path / "config.json").read_text(encoding="utf-8")))


def status_markdown(view) -> str:
    from studio.train.monitor import fmt_duration

    head = f"### {view.name}\n**{STATE_WORDS.get(view.state, view.state)}**"
    if view.state == "queued":
        head += f" — {_ordinal(view.queue_position)} in line; starts when the GPU is free."
    parts = [head]
    if view.max_steps:
        pct = 100 * view.step / view.max_steps
        parts.append(f"Step **{view.step} / {view.max_steps}** ({pct:.0f}%)" + (f" · {view.method}" if view.method else ""))
    stats = []
    if view.losses:
        stats.append(f"loss {view.losses[-1]:.4f} (smoothed {view.smoothed[-1]:.4f})")
    if view.lr is not None:
        stats.append(f"learning rate {view.lr:.2e}")
    if view.it_per_s:
        stats.append(f"{view.it_per_s:.2f} it/s" if view.it_per_s >= 1 else f"{1 / view.it_per_s:.1f} s/it")
    if view.eta_s is not None:
        stats.append(f"ETA {fmt_duration(view.eta_s)}")
    if view.memory:
        stats.append(view.memory)
    if view.duration_s is not None and view.state not in ("running", "starting"):
        stats.append(f"took {fmt_duration(view.duration_s)}")
    if stats:
        parts.append(" · ".join(stats))
    if view.error:
        parts.append(f"❌ **{view.error}**" + (f"\n\nWhat to do: {view.fix}" if view.fix else ""))
    if view.output and Path(view.output).is_file():
        parts.append(f"Adapter: `{view.output}`")
    parts.append(_gpu_line())
    return "\n\n".join(parts)


def run_state(ctx, run_dir=None) -> dict:
    """Everything the tab shows about a run. With no run (a fresh page load) it shows the run that is
    training now, else the next queued, else the newest — from the run folder, not the browser."""
    from studio.train.monitor import current_run, plot_points, watch

    path = _run_dir(ctx, run_dir) if run_dir else current_run(ctx.workspace.runs)
    if path is None:
        return {"run_dir": "", "state": "none", "step": 0, "status": "No runs yet. Set up a run and press "
                "**Start training**.\n\n" + _gpu_line(), "plot": [], "gallery": [], "log": "", "output": None}
    view = watch(path)
    return {"run_dir": str(path), "state": view.state, "step": view.step, "status": status_markdown(view),
            "plot": plot_points(view), "gallery": [(p, f"step {s}") for p, s in reversed(view.samples)],
            "log": view.log_tail, "output": view.output if view.output and Path(view.output).is_file() else None,
            "view": view}


def history(ctx) -> list[list]:
    """One row per run in the workspace, newest first."""
    from studio.train.monitor import fmt_duration, watch

    root = ctx.workspace.runs
    if not root.is_dir():
        return []
    runs = [p for p in root.iterdir() if p.is_dir() and (p / "config.json").is_file()]
    rows = []
    for p in sorted(runs, key=lambda p: (p / "config.json").stat().st_mtime, reverse=True):
        v = watch(p)
        rows.append([p.name, v.state, v.method, f"{v.step}/{v.max_steps}",
                     "-" if v.final_loss is None else round(v.final_loss, 4), fmt_duration(v.duration_s),
                     v.output if v.output and Path(v.output).is_file() else ""])
    return rows


def output_of(ctx, run_dir) -> str:
    """The adapter file of a run (for Inspect / Generate)."""
    from studio.train.monitor import watch

    view = watch(_run_dir(ctx, run_dir))
    if not view.output or not Path(view.output).is_file():
        raise StudioError(f"{view.name} has no adapter file yet.",
                          "It is written when the run finishes or is cancelled.")
    return str(ctx.safe_path(view.output, must_exist=True))


# --- layout -----------------------------------------------------------------------------------------

def _find(block, label: str):
    """A component by label inside a layout block (for wiring into another tab)."""
    for child in getattr(block, "children", []) or []:
        if getattr(child, "label", None) == label:
            return child
        found = _find(child, label)
        if found is not None:
            return found
    return None


def _plot_frame(rows):
    """The loss plot's data; None while there is none (Gradio 6.31 draws no lines in a plot whose
    first value was an empty frame, even after data arrives)."""
    import pandas as pd

    if not rows:
        return None
    frame = pd.DataFrame(rows, columns=["step", "loss", "series"])
    return frame.astype({"step": "int64", "loss": "float64", "series": "object"})


def build(ctx) -> None:
    from studio.train.plan import preset_choices, preset_values

    ws = ctx.workspace
    defaults = preset_values(None)
    gr.Markdown("Train an adapter on a dataset. Runs go on in their own process: you can close or reload the "
                "page, and come back to the same run.")
    c: dict = {}
    with gr.Row():
        with gr.Column(scale=5):
            with gr.Row():
                c["dataset"] = gr.Dropdown(dataset_choices(ws), label="Dataset", allow_custom_value=True, scale=6,
                                           elem_id="train-dataset",
                                           info="A folder of images with .txt captions (see the Dataset tab).")
                refresh = gr.Button("Refresh", size="sm", scale=0, min_width=90)
            with gr.Row():
                c["method"] = gr.Dropdown(list(METHODS), value=defaults["method"], label="Method", elem_id="train-method",
                                          info="What kind of adapter to train.")
                c["preset"] = gr.Dropdown(preset_choices(), value="", label="Preset", elem_id="train-preset",
                                          info="Settings tuned for a GPU size; filling the form below.")
            method_help = gr.Markdown(METHOD_HELP[defaults["method"]])
            with gr.Row():
                c["resolution"] = gr.Dropdown(RESOLUTIONS, value=defaults["resolution"], label="Resolution", elem_id="train-resolution",
                                              allow_custom_value=True,
                                              info="Image side in pixels: 512 for SD1.5, 1024 for SDXL, 64 for the "
                                                   "tiny demo model.")
                c["batch_size"] = gr.Number(defaults["batch_size"], precision=0, minimum=1, label="Batch size",
                                            info="Images per step. Higher is faster per image but needs more VRAM.")
                c["max_train_steps"] = gr.Number(defaults["max_train_steps"], precision=0, minimum=1,
                                                 label="Max steps", elem_id="train-max-steps", info="How long to train, in optimizer steps.")
                c["epochs"] = gr.Number(0, precision=2, minimum=0, label="Epochs (0 = use Max steps)",
                                        info="Or: how many times to go through the dataset.")
            steps_md = gr.Markdown("Choose a dataset to see how many steps this makes.", elem_id="train-steps-line")
            with gr.Row():
                c["sample_every_n_steps"] = gr.Number(defaults["sample_every_n_steps"], precision=0, minimum=0,
                                                      label="Sample every N steps", elem_id="train-sample-every",
                                                      info="Draw preview images from the prompts below (0 = never).")
                c["save_every_n_steps"] = gr.Number(defaults["save_every_n_steps"], precision=0, minimum=0,
                                                    label="Save every N steps", elem_id="train-save-every",
                                                    info="Keep a checkpoint you can resume from (0 = only at the end).")
            c["sample_prompts"] = gr.Textbox(label="Preview prompts (one per line)", lines=2, elem_id="train-prompts",
                                             placeholder="a photo of sks dog on a beach",
                                             info="Use your trigger word, to see it being learned.")
            c["output_name"] = gr.Textbox(defaults["output_name"], label="Output name",
                                          info="The adapter file's name (and the run folder's).")
            with gr.Accordion("Adapter size", open=False):
                gr.Markdown("Rank is the adapter's capacity: 8-32 suits faces and objects, 32-64 styles. Bigger "
                            "learns more detail but makes larger files and overfits sooner. Alpha scales the "
                            "update; alpha = rank or rank / 2 is usual (lower alpha = gentler learning).")
                with gr.Row():
                    c["rank"] = gr.Number(defaults["rank"], precision=0, minimum=1, label="Rank (network dim)")
                    c["alpha"] = gr.Number(defaults["alpha"], minimum=0.01, label="Alpha")
                with gr.Row():
                    c["train_text_encoder"] = gr.Checkbox(defaults["train_text_encoder"], label="Train the text encoder too",
                                                          info="Learns the trigger word more strongly; needs more VRAM.")
                    c["text_encoder_lr"] = gr.Number(defaults["text_encoder_lr"], label="Text encoder learning rate",
                                                     info="0 = the same as the learning rate; usually 2-10x lower.")
            with gr.Accordion("Learning rate and optimizer", open=False):
                gr.Markdown("The learning rate is how big each step's change is. Too high: images burn or "
                            "collapse to noise; too low: nothing is learned. 1e-4 is a safe start for LoRA with "
                            "AdamW; LoHa / LoKr want more; Prodigy sets its own (use 1.0).")
                with gr.Row():
                    c["learning_rate"] = gr.Number(defaults["learning_rate"], label="Learning rate")
                    c["optimizer"] = gr.Dropdown(["adamw", "adamw8bit", "adafactor", "prodigy"],
                                                 value=defaults["optimizer"], label="Optimizer",
                                                 info="adamw8bit and adafactor use less VRAM.")
                with gr.Row():
                    c["lr_scheduler"] = gr.Dropdown(["constant", "constant_with_warmup", "cosine", "linear"],
                                                    value=defaults["lr_scheduler"], label="Schedule",
                                                    info="cosine: lowers the rate towards the end, often cleaner.")
                    c["lr_warmup_steps"] = gr.Number(defaults["lr_warmup_steps"], precision=0, minimum=0,
                                                     label="Warm-up steps", info="Ramp the rate up at the start.")
                    c["gradient_accumulation_steps"] = gr.Number(
                        defaults["gradient_accumulation_steps"], precision=0, minimum=1, label="Gradient accumulation",
                        info="Acts like a bigger batch without the VRAM: N batches per step.")
            with gr.Accordion("Memory and speed", open=False):
                gr.Markdown("Change these when you run out of memory or want more speed; presets set them for "
                            "your GPU size.")
                with gr.Row():
                    c["mixed_precision"] = gr.Dropdown(["fp16", "bf16", "no"], value=defaults["mixed_precision"],
                                                       label="Precision",
                                                       info="fp16 for most cards; bf16 on RTX 30xx and newer.")
                    c["gradient_checkpointing"] = gr.Checkbox(defaults["gradient_checkpointing"],
                                                              label="Gradient checkpointing",
                                                              info="Much less VRAM, about 20% slower.")
                    c["cache_latents"] = gr.Checkbox(defaults["cache_latents"], label="Cache latents",
                                                     info="Encode images once: faster and less VRAM.")
                with gr.Row():
                    c["enable_buckets"] = gr.Checkbox(defaults["enable_buckets"], label="Aspect-ratio buckets",
                                                      info="Train wide and tall images without cropping them square.")
                    c["save_dtype"] = gr.Dropdown(["fp16", "bf16", "fp32"], value=defaults["save_dtype"],
                                                  label="Save as", info="fp16: half the file size, same results.")
                    c["seed"] = gr.Number(defaults["seed"], precision=0, label="Seed",
                                          info="The same seed and settings train the same adapter.")
            with gr.Accordion("Captions and noise", open=False):
                gr.Markdown("Fine-tuning for how captions and noise are used. The defaults are fine to start.")
                with gr.Row():
                    c["caption_dropout"] = gr.Number(defaults["caption_dropout"], minimum=0, maximum=1,
                                                     label="Caption dropout",
                                                     info="Share of steps trained without a caption (0.05-0.1 helps styles).")
                    c["shuffle_tags"] = gr.Checkbox(defaults["shuffle_tags"], label="Shuffle tags",
                                                    info="For comma-separated tag captions.")
                    c["keep_tokens"] = gr.Number(defaults["keep_tokens"], precision=0, minimum=0,
                                                 label="Keep first N tags in place", info="Your trigger word stays first.")
                with gr.Row():
                    c["clip_skip"] = gr.Number(defaults["clip_skip"], precision=0, minimum=1, maximum=12,
                                               label="Clip skip", info="2 for anime models based on NovelAI, else 1.")
                    c["noise_offset"] = gr.Number(defaults["noise_offset"], minimum=0, maximum=1, label="Noise offset",
                                                  info="0.05-0.1 lets the model learn very dark and bright images.")
                    c["min_snr_gamma"] = gr.Number(defaults["min_snr_gamma"], minimum=0, label="Min-SNR gamma",
                                                   info="5 steadies training; 0 = off.")
                    c["sample_steps"] = gr.Number(defaults["sample_steps"], precision=0, minimum=1,
                                                  label="Preview sampling steps")
            with gr.Accordion("Other settings", open=False):
                extra = gr.Textbox(label="Other settings (key=value, one per line)", lines=3,
                                   placeholder="conv_rank=8\nweight_decay=0.01",
                                   info="Any key of presets/*.json; a wrong key is refused by name.")
            estimate_md = gr.Markdown()
            with gr.Row():
                go = gr.Button("Start training", variant="primary", elem_id="train-start")
                stop = gr.Button("Cancel", variant="stop", elem_id="train-cancel")
                again = gr.Button("Resume", elem_id="train-resume")
                dup = gr.Button("Duplicate config")
            with gr.Row():
                to_inspect = gr.Button("Open in Inspect", size="sm")
                to_generate = gr.Button("Open in Generate", size="sm")
            message = gr.Markdown(elem_id="train-message")
        with gr.Column(scale=6):
            status = gr.Markdown("Loading…", elem_id="train-status", label="Status")
            plot = gr.LinePlot(None, x="step", y="loss", color="series", label="Loss", height=320, elem_id="train-loss",
                               x_title="step", y_title="loss (raw and smoothed)")
            gallery = gr.Gallery(label="Preview images", elem_id="train-previews", columns=4, height=280, allow_preview=True)
            log = gr.Textbox(label="Log", elem_id="train-log", lines=8, max_lines=8, interactive=False, autoscroll=True)
    with gr.Accordion("Runs", open=True):
        runs = gr.Dataframe(headers=HISTORY_HEADERS, label="Runs (click one to show it)", interactive=False,
                            elem_id="train-runs",
                            wrap=True)
        refresh_runs = gr.Button("Refresh runs", size="sm")

    watched = gr.State("")  # the run shown; "" = whatever runs now (restored on every page load)
    seen = gr.State("")  # what the live view last drew, to skip redrawing an unchanged run
    form = [ctx.model_picker, c["dataset"], c["preset"], c["epochs"], *[c[k] for k in FORM_KEYS]]
    live = [watched, status, plot, gallery, log, runs, seen]

    def _values(args) -> dict:
        return dict(zip(INPUT_KEYS, args))

    def _live(run_dir, last_seen, force=False):
        try:
            s = run_state(ctx, run_dir or None)
        except StudioError:  # the watched run was removed: show the current one
            s = run_state(ctx, None)
        key = f"{s['run_dir']}|{s['state']}|{s['step']}|{len(s['gallery'])}"
        if key == last_seen and not force:
            return s["run_dir"], s["status"], gr.skip(), gr.skip(), s["log"], gr.skip(), key
        old_state = last_seen.split("|")[1] if last_seen.count("|") >= 3 else None
        rows = history(ctx) if force or old_state != s["state"] or not last_seen else gr.skip()
        return s["run_dir"], s["status"], _plot_frame(s["plot"]), s["gallery"], s["log"], rows, key

    timer = gr.Timer(POLL_S)
    timer.tick(_live, [watched, seen], live, show_progress="hidden", concurrency_limit=None)

    def _steps(ds, bs, acc, ep, ms, res, buckets, *args):
        return steps_line(ctx, ds, bs, acc, ep, ms, res, buckets), estimate_line(_values(args))

    plan_inputs = [c["dataset"], c["batch_size"], c["gradient_accumulation_steps"], c["epochs"], c["max_train_steps"],
                   c["resolution"], c["enable_buckets"]]
    for comp in plan_inputs + [c["method"], c["rank"], ctx.model_picker]:
        comp.change(_steps, plan_inputs + form, [steps_md, estimate_md], show_progress="hidden")

    refresh.click(lambda: gr.update(choices=dataset_choices(ws)), None, c["dataset"])

    def _refresh_on_open():  # a dataset just brought in on the Dataset tab shows up here
        tab = ctx.components.get("tab:train")
        if tab is not None:
            tab.select(lambda: gr.update(choices=dataset_choices(ws)), None, c["dataset"])

    ctx.on_built.append(_refresh_on_open)
    c["method"].change(lambda m: METHOD_HELP.get(m, ""), c["method"], method_help)

    preset_outputs = [c[k] for k in FORM_KEYS if k not in ("output_name", "sample_prompts")]

    def _preset(name):
        try:
            vals = preset_values(name)
        except StudioError as err:
            return [gr.skip()] * len(preset_outputs) + [_error_md(err)]
        msg = f"Preset **{name}** loaded into the form." if name else "Built-in defaults loaded into the form."
        return [vals[k] for k in FORM_KEYS if k not in ("output_name", "sample_prompts")] + [msg]

    c["preset"].change(_preset, c["preset"], preset_outputs + [message])

    def _start(*args):
        *vals, extra_text, last_seen = args
        try:
            run_dir, msg = start(ctx, _values(vals), extra_text)
        except StudioError as err:
            return [gr.skip(), _error_md(err)] + [gr.skip()] * (len(live) - 1)
        return [run_dir, msg] + list(_live(run_dir, "", force=True))[1:]

    go.click(_start, form + [extra, seen], [watched, message, *live[1:]])

    def _act(fn):
        def handler(run_dir, max_steps, last_seen):
            try:
                msg = fn(run_dir, max_steps)
            except StudioError as err:
                return [_error_md(err)] + [gr.skip()] * len(live)
            return [msg] + list(_live(run_dir, "", force=True))
        return handler

    stop.click(_act(lambda r, _m: cancel(ctx, r)), [watched, c["max_train_steps"], seen], [message, *live],
               concurrency_limit=None)
    again.click(_act(lambda r, m: resume(ctx, r, m)), [watched, c["max_train_steps"], seen], [message, *live])

    dup_outputs = [ctx.model_picker, c["dataset"], *[c[k] for k in FORM_KEYS]]

    def _dup(run_dir):
        try:
            vals = duplicate(ctx, run_dir)
        except StudioError as err:
            return [gr.skip()] * len(dup_outputs) + [_error_md(err)]
        out = [vals.get("base_model") or gr.skip(), vals.get("dataset") or gr.skip()]
        out += [vals[k] if vals.get(k) is not None else gr.skip() for k in FORM_KEYS]
        return out + ["Config copied into the form: change what you like, then **Start training**."]

    dup.click(_dup, watched, dup_outputs + [message])

    def _select(last_seen, evt: gr.SelectData):
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        rows = history(ctx)
        if row is None or row >= len(rows):
            return [gr.skip()] * len(live)
        return list(_live(str(ws.runs / rows[row][0]), "", force=True))

    runs.select(_select, [seen], live)
    refresh_runs.click(lambda: history(ctx), None, runs)

    def _wire_other_tabs():
        inspect_path = ctx.components.get("inspect_path")
        if inspect_path is not None and ctx.tabs is not None:
            def _open_inspect(run_dir):
                try:
                    return output_of(ctx, run_dir), gr.Tabs(selected="inspect"), ""
                except StudioError as err:
                    return gr.skip(), gr.skip(), _error_md(err)
            to_inspect.click(_open_inspect, watched, [inspect_path, ctx.tabs, message])
        generate_tab = next((t for t in getattr(ctx.tabs, "children", []) if getattr(t, "id", None) == "generate"),
                            None)
        adapter = ctx.components.get("generate_adapter") or (generate_tab and _find(generate_tab, "Adapter 1"))
        prompt = ctx.components.get("generate_prompt") or (generate_tab and _find(generate_tab, "Prompt"))
        if adapter is not None and prompt is not None:
            def _open_generate(run_dir):
                try:
                    path = output_of(ctx, run_dir)
                    prompts = duplicate(ctx, run_dir).get("sample_prompts") or ""
                except StudioError as err:
                    return gr.skip(), gr.skip(), gr.skip(), _error_md(err)
                first = prompts.splitlines()[0] if prompts else gr.skip()
                return gr.update(value=path), first, gr.Tabs(selected="generate"), ""
            to_generate.click(_open_generate, watched, [adapter, prompt, ctx.tabs, message])
        else:
            to_generate.click(lambda: "The Generate tab is not available.", None, message)

    ctx.on_built.append(_wire_other_tabs)
