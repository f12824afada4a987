"""The base-model picker shared by all tabs."""

from __future__ import annotations

import gradio as gr

from studio.models.discovery import discover_models


def model_choices(ctx) -> list[tuple[str, str]]:
    return [(f"[{e.family or '?'}] {e.label}", e.spec) for e in discover_models(ctx.models_dirs, ctx.settings)]


def build(ctx) -> gr.Dropdown:
    choices = model_choices(ctx)
    default = ctx.settings.last_model if ctx.settings.last_model in [c[1] for c in choices] else choices[0][1]
    with gr.Row():
        picker = gr.Dropdown(choices=choices, value=default, label="Base model", allow_custom_value=True,
                             info="A checkpoint from your webUI folders, a diffusers folder, a hub id "
                                  "(owner/name), or the tiny demo model.", scale=8)
        refresh = gr.Button("Rescan", scale=0, size="sm", min_width=90)

    def _remember(spec):
        if spec:
            ctx.settings.last_model = spec
            ctx.settings.save()

    picker.change(_remember, picker, None)
    refresh.click(lambda: gr.update(choices=model_choices(ctx)), None, picker)
    return picker
