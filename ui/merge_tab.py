"""The Merge tab."""

from __future__ import annotations

import gradio as gr


def build(ctx) -> None:
    gr.Markdown("The Merge tab is being built.")
