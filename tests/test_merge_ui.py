"""The Merge tab builds, and its handlers merge / bake into the workspace and refuse paths outside it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from studio.errors import StudioError
from studio.places import Settings, Workspace
from test_merge_util import random_lora_modules, rel, weight_shapes, weighted_sum, write_lora
from ui import merge_tab as tab
from ui.context import AppContext


@pytest.fixture
def ctx(tmp_path, tiny_sd1_file):
    ws = Workspace(tmp_path / "ws").ensure()
    settings = Settings(models_dirs=[str(Path(tiny_sd1_file).parent)])
    return AppContext(settings=settings, workspace=ws)


def test_tab_builds_and_wires_inspect(ctx):
    import gradio as gr

    with gr.Blocks():
        ctx.model_picker = gr.Dropdown(choices=["tiny:sd1"], value="tiny:sd1")
        with gr.Tabs() as tabs:
            ctx.tabs = tabs
            with gr.Tab("Merge", id="merge"):
                tab.build(ctx)
            with gr.Tab("Inspect", id="inspect"):
                ctx.components["inspect_path"] = gr.Textbox()
        for hook in ctx.on_built:
            hook()


def test_merge_and_bake_handlers(ctx, sd1_pipe, tiny_sd1_file):
    from studio.adapters import load_adapter
    from test_merge_util import dense_deltas

    shapes = weight_shapes(sd1_pipe)
    a = write_lora(Path(ctx.workspace.loras) / "a.safetensors", random_lora_modules(shapes, 4, 4.0, seed=1))
    b = write_lora(Path(ctx.workspace.loras) / "b.safetensors", random_lora_modules(shapes, 2, 2.0, seed=2))
    assert [p for _, p in tab.adapter_choices(ctx)] == [str(a), str(b)]

    paths = [str(a), str(b)] + [None] * (tab.MAX_INPUTS - 2)
    weights = [0.6, -0.4] + [1.0] * (tab.MAX_INPUTS - 2)
    text, out = tab.run_merge(ctx, paths, weights, "Exact (concat, rank = sum of ranks)", 32, 0.9, "", False,
                              "", "blend", "fp32")
    assert Path(out) == Path(ctx.workspace.loras) / "blend.safetensors" and "Wrote blend.safetensors" in text
    want, got = weighted_sum([(a, 0.6), (b, -0.4)]), dense_deltas(out)
    assert all(rel(got[n], want[n]) <= 1e-5 for n in want)

    text, out = tab.run_merge(ctx, paths, weights, "SVD to a rank", 3, 0.9, "te=0", False, "", "small", "fp16")
    f = load_adapter(out)
    assert {m.rank for m in f.modules.values()} == {3} and not any(n.startswith("lora_te_") for n in f.modules)

    text, out = tab.run_merge(ctx, paths, weights, "", 0, 0, "", True, str(tiny_sd1_file), "baked", "fp16")
    assert Path(out).parent == Path(ctx.workspace.checkpoints)
    from studio.fileio import read_safetensors_header

    recipe = json.loads(read_safetensors_header(out).metadata["studio.merge_recipe"])
    assert recipe["method"] == "bake" and recipe["base"]["name"] == Path(tiny_sd1_file).name


def test_paths_from_the_browser_are_confined(ctx, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(b"x" * 16)
    with pytest.raises(StudioError, match="outside"):
        tab.run_merge(ctx, [str(outside)], [1.0], "", 0, 0, "", False, "", "x", "fp16")
    with pytest.raises(StudioError, match="No adapters"):
        tab.run_merge(ctx, [None, ""], [1.0, 1.0], "", 0, 0, "", False, "", "x", "fp16")
    assert tab._output_name("../../evil.safetensors", "d") == "evil.safetensors"
