"""The Train tab."""

from __future__ import annotations

import gradio as gr


def build(ctx) -> None:
    gr.Markdown("The Train tab is being built.")
