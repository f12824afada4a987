"""The Inspect tab."""

from __future__ import annotations

import gradio as gr


def build(ctx) -> None:
    gr.Markdown("The Inspect tab is being built.")
