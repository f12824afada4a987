"""The Dataset tab."""

from __future__ import annotations

import gradio as gr


def build(ctx) -> None:
    gr.Markdown("The Dataset tab is being built.")
