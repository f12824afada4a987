"""The Generate tab: test adapters the way webUIs apply them, single images or an XY grid."""

from __future__ import annotations

import threading

import gradio as gr

from studio.errors import StudioError

_cancel = threading.Event()
MAX_ADAPTERS = 4
SAMPLERS = ["Euler a", "Euler", "Heun", "DPM2", "DPM2 a", "DPM++ 2M", "DPM++ 2M Karras", "DPM++ 2M SDE",
            "DPM++ 2M SDE Karras", "DPM++ 2S a", "Euler Karras", "DDIM", "PLMS", "UniPC", "LCM"]
AXES = ["(none)", "Adapter weight", "Adapter file", "Seed", "CFG", "Steps"]


def _gpu_line() -> str:
    from studio.jobs import GPU

    s = GPU.status()
    if not s["busy"]:
        return "GPU free."
    queued = f" ({len(s['queued'])} waiting)" if s["queued"] else ""
    return f"GPU busy: {s['current']}{queued}. Generation waits its turn."


def _adapter_files(ctx) -> list[str]:
    from studio.generate.engine import lora_search_dirs

    out = []
    for folder in lora_search_dirs():
        if folder.is_dir():
            out += sorted(str(p) for p in folder.rglob("*.safetensors"))
    return out


def _request(ctx, model, prompt, negative, sampler, steps, cfg, width, height, seed, batch, clip_skip, embeds,
             *adapter_values):
    from studio.generate.engine import AdapterChoice, GenerateRequest

    adapters = []
    for i in range(MAX_ADAPTERS):
        path, unet_w, te_w, separate = adapter_values[4 * i: 4 * i + 4]
        if path:
            path = str(ctx.safe_path(path, must_exist=True))  # from the browser: only the studio's folders
            adapters.append(AdapterChoice(path, float(unet_w), float(te_w) if separate else None))
    embeds = [str(ctx.safe_path(e, must_exist=True)) for e in (embeds or []) if e]
    return GenerateRequest(model=model, prompt=prompt or "", negative=negative or "", steps=int(steps),
                           cfg=float(cfg), width=int(width), height=int(height), seed=int(seed),
                           sampler=sampler, clip_skip=int(clip_skip), batch=int(batch), adapters=adapters,
                           embeddings=embeds,
                           out_dir=str(ctx.workspace.images))


def build(ctx) -> None:
    with gr.Row():
        with gr.Column(scale=3):
            prompt = gr.Textbox(label="Prompt", lines=3,
                                placeholder="a photo of sks dog, (detailed:1.2) <lora:mydog:0.8>",
                                info="webUI syntax: (word:1.2), [word], BREAK, <lora:name:weight>")
            negative = gr.Textbox(label="Negative prompt", lines=2)
            with gr.Row():
                sampler = gr.Dropdown(SAMPLERS, value="Euler a", label="Sampler")
                steps = gr.Slider(1, 150, value=20, step=1, label="Steps")
                cfg = gr.Slider(1, 30, value=7, step=0.5, label="CFG scale")
            with gr.Row():
                width = gr.Slider(64, 2048, value=512, step=8, label="Width")
                height = gr.Slider(64, 2048, value=512, step=8, label="Height")
                seed = gr.Number(value=-1, precision=0, label="Seed (-1 random)")
                batch = gr.Slider(1, 8, value=1, step=1, label="Batch")
                clip_skip = gr.Slider(1, 12, value=1, step=1, label="Clip skip")
            with gr.Accordion("Adapters (changing them never reloads the base model)", open=True):
                rows = []
                choices = _adapter_files(ctx)
                for i in range(MAX_ADAPTERS):
                    with gr.Row():
                        f = gr.Dropdown(choices, value=None, label=f"Adapter {i + 1}", allow_custom_value=True, scale=4)
                        w = gr.Slider(-2, 2, value=1.0, step=0.05, label="Weight (UNet)", scale=2)
                        tw = gr.Slider(-2, 2, value=1.0, step=0.05, label="Text-encoder weight", scale=2)
                        sep = gr.Checkbox(value=False, label="Separate TE weight", scale=1)
                    rows += [f, w, tw, sep]
                embeds = gr.Dropdown([], multiselect=True, allow_custom_value=True,
                                     label="Embeddings (write the file name in the prompt)")
            with gr.Accordion("XY grid", open=False):
                with gr.Row():
                    x_axis = gr.Dropdown(AXES, value="(none)", label="X axis")
                    x_vals = gr.Textbox(label="X values", placeholder="0.4, 0.7, 1.0")
                with gr.Row():
                    y_axis = gr.Dropdown(AXES, value="(none)", label="Y axis")
                    y_vals = gr.Textbox(label="Y values", placeholder="one checkpoint file per line")
            with gr.Row():
                go = gr.Button("Generate", variant="primary")
                stop = gr.Button("Cancel", variant="stop")
                params_png = gr.File(label="Load parameters from a PNG", file_types=[".png", ".jpg", ".webp"],
                                     type="filepath")
        with gr.Column(scale=2):
            gpu = gr.Markdown(_gpu_line())
            gallery = gr.Gallery(label="Images", columns=2, height=512)
            info = gr.Textbox(label="Parameters (what a webUI reads)", lines=6, interactive=False)

    inputs = [ctx.model_picker, prompt, negative, sampler, steps, cfg, width, height, seed, batch, clip_skip,
              embeds, *rows]

    def _run(x_ax, x_text, y_ax, y_text, *values, progress=gr.Progress()):
        from studio.generate.engine import generate
        from studio.generate.xy import parse_values, run_xy

        _cancel.clear()
        try:
            req = _request(ctx, *values)
            cb = lambda s, t: progress(s / max(t, 1), desc=f"step {s}/{t}")  # noqa: E731
            if x_ax and x_ax != "(none)":
                ys = (y_ax, parse_values(y_ax, y_text)) if y_ax and y_ax != "(none)" else (None, None)
                res = run_xy(req, x_ax, parse_values(x_ax, x_text), ys[0], ys[1], cb, _cancel)
                note = "\n".join(res.warnings)
                return [res.grid], f"Saved {res.path}\n{note}".strip(), _gpu_line()
            res = generate(req, cb, _cancel)
            text = res.infotexts[0] + ("\n\n" + "\n".join(res.warnings) if res.warnings else "")
            return res.images, text, _gpu_line()
        except StudioError as err:
            raise gr.Error(str(err)) from None

    go.click(_run, [x_axis, x_vals, y_axis, y_vals, *inputs], [gallery, info, gpu])
    stop.click(lambda: _cancel.set(), None, None)

    def _load_png(path):
        from studio.generate.infotext import read_image_params

        if not path:
            return [gr.update()] * 10
        try:
            p = read_image_params(ctx.safe_path(path, must_exist=True))
        except StudioError as err:
            raise gr.Error(str(err)) from None
        return (p.prompt, p.negative, p.sampler if p.sampler in SAMPLERS else gr.update(), p.steps, p.cfg,
                p.width, p.height, p.seed, p.clip_skip, p.model and f"Model in the file: {p.model} {p.model_hash}")

    params_png.change(_load_png, params_png,
                      [prompt, negative, sampler, steps, cfg, width, height, seed, clip_skip, gpu])
    timer = gr.Timer(3.0)
    timer.tick(_gpu_line, None, gpu)
