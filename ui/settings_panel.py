"""Settings: workspace, webUI model folders, precision and device, Hugging Face token."""

from __future__ import annotations

import gradio as gr

from studio.places import Workspace, load_hf_token, save_hf_token


def build(ctx) -> None:
    s = ctx.settings
    with gr.Accordion("Settings", open=False):
        workspace = gr.Textbox(value=str(ctx.workspace.root), label="Workspace folder",
                               info="Datasets, runs and outputs live here. Takes effect after a restart.")
        models = gr.Textbox(value="\n".join(s.models_dirs), lines=2, label="Checkpoint folders (one per line)",
                            info="An A1111 / Forge / ComfyUI install, or any folder of .safetensors checkpoints.")
        loras = gr.Textbox(value="\n".join(s.lora_dirs), lines=2, label="LoRA folders (one per line)",
                           info="e.g. stable-diffusion-webui/models/Lora or ComfyUI/models/loras.")
        data = gr.Textbox(value="\n".join(s.data_dirs), lines=2, label="Other folders the studio may open",
                          info="e.g. your photo folders, to use a dataset in place. Nothing outside the workspace "
                               "and these folders can be opened from the browser.")
        if ctx.remote:
            for box in (workspace, models, loras, data):
                box.interactive = False
            gr.Markdown("The studio is reachable from other machines: folders can only be changed on this "
                        "computer (command-line options or settings.json).")
        with gr.Row():
            precision = gr.Dropdown(["auto", "fp16", "bf16", "fp32"], value=s.precision, label="Precision",
                                    info="auto: fp16 on a GPU, fp32 on the CPU. bf16 needs an RTX 30xx or newer.")
            device = gr.Dropdown(["auto", "cuda", "cpu", "mps"], value=s.device, label="Device")
        token = gr.Textbox(value="", type="password", label="Hugging Face token (optional)",
                           placeholder="set" if load_hf_token() else "hf_...",
                           info="Only for gated models. Stored readable by your user only.")
        save = gr.Button("Save settings")
        status = gr.Markdown()

    def _save(ws, m, lo, da, prec, dev, tok):
        from studio.errors import StudioError

        if ctx.remote:  # never trust folder changes from a guest, whatever the page sent
            ws, m, lo, da = str(ctx.workspace.root), "\n".join(s.models_dirs), "\n".join(s.lora_dirs), \
                "\n".join(s.data_dirs)
        try:
            Workspace(ws).ensure()
        except StudioError as err:
            return f"**Not saved:** {err}"
        s.workspace = ws.strip()
        s.models_dirs = [x.strip() for x in m.splitlines() if x.strip()]
        s.lora_dirs = [x.strip() for x in lo.splitlines() if x.strip()]
        s.data_dirs = [x.strip() for x in da.splitlines() if x.strip()]
        s.precision, s.device = prec, dev
        s.save()
        if tok.strip():
            save_hf_token(tok)
        ctx.models_dirs[:] = s.models_dirs
        return "Saved. Folder changes apply to the model lists now; a new workspace after a restart."

    save.click(_save, [workspace, models, loras, data, precision, device, token], status)
