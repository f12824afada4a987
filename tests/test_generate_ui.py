"""The Generate tab builds, shows the GPU gate, and fills the form from a PNG's parameters."""

from __future__ import annotations


def test_generate_tab_builds_and_shows_gpu_busy(tmp_path):
    import gradio as gr

    from studio.jobs import GPU
    from studio.places import Settings, Workspace
    from ui import generate_tab
    from ui.context import AppContext

    ctx = AppContext(settings=Settings(), workspace=Workspace(tmp_path).ensure())
    with gr.Blocks():
        ctx.model_picker = gr.Dropdown(["tiny:sd1"], value="tiny:sd1")
        generate_tab.build(ctx)
    assert generate_tab._gpu_line() == "GPU free."
    with GPU.job("train", "run foo"):
        assert generate_tab._gpu_line().startswith("GPU busy: train 'run foo'")
    a, b = ctx.workspace.loras / "a.safetensors", ctx.workspace.loras / "b.safetensors"
    a.write_bytes(b"x")
    b.write_bytes(b"x")
    req = generate_tab._request(ctx, "tiny:sd1", "p", "", "Euler a", 2, 7, 64, 64, 1, 1, 1, [],
                                str(a), 0.8, 0.3, True, "outputs/loras/b.safetensors", 0.5, 1.0, False,
                                None, 1, 1, False, "", 1, 1, False)
    assert [(x.path, x.weight, x.te_weight) for x in req.adapters] == [(str(a), 0.8, 0.3), (str(b), 0.5, None)]
