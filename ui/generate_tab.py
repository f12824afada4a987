"""The Generate tab."""

from __future__ import annotations

import gradio as gr


def build(ctx) -> None:
    gr.Markdown("The Generate tab is being built.")
