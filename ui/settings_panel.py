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
        with gr.Row():
            precision = gr.Dropdown(["auto", "fp16", "bf16", "fp32"], value=s.precision, label="Precision",
                                    info="auto: fp16 on a GPU, fp32 on the CPU. bf16 needs an RTX 30xx or newer.")
            device = gr.Dropdown(["auto", "cuda", "cpu", "mps"], value=s.device, label="Device")
        token = gr.Textbox(value="", type="password", label="Hugging Face token (optional)",
                           placeholder="set" if load_hf_token() else "hf_...",
                           info="Only for gated models. Stored readable by your user only.")
        save = gr.Button("Save settings")
        status = gr.Markdown()

    def _save(ws, m, lo, prec, dev, tok):
        from studio.errors import StudioError

        try:
            Workspace(ws).ensure()
        except StudioError as err:
            return f"**Not saved:** {err}"
        s.workspace = ws.strip()
        s.models_dirs = [x.strip() for x in m.splitlines() if x.strip()]
        s.lora_dirs = [x.strip() for x in lo.splitlines() if x.strip()]
        s.precision, s.device = prec, dev
        s.save()
        if tok.strip():
            save_hf_token(tok)
        ctx.models_dirs[:] = s.models_dirs
        return "Saved. Folder changes apply to the model lists now; a new workspace after a restart."

    save.click(_save, [workspace, models, loras, precision, device, token], status)
