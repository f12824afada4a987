"""The Merge tab: blend adapters by weight (exact or re-ranked), or bake them into the base model.

Thin by design: the handlers call ``studio.merge`` and format the result; they are plain module
functions so tests can call them without a browser. Every path from the browser goes through
``ctx.safe_path``. The result can be opened in Inspect; the preview renders one prompt / seed with
the inputs applied at run time and with the merged file, through the Generate engine.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from studio.errors import StudioError

MAX_INPUTS = 6
METHODS = {"Exact (concat, rank = sum of ranks)": "concat", "SVD to a rank": "svd",
           "Dynamic rank (keep an energy fraction)": "energy"}
ADAPTER_SUFFIXES = (".safetensors",)
LIST_LIMIT = 2000


def _error(err: StudioError) -> str:
    return f"**{err.message}**" + (f"\n\n{err.fix}" if err.fix else "")


def adapter_choices(ctx) -> list[tuple[str, str]]:
    """(label, path) of the adapters in the workspace's LoRA folder and the webUI LoRA folders."""
    folders = [Path(ctx.workspace.loras), *[Path(d) for d in ctx.settings.lora_dirs]]
    out = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for p in sorted(folder.rglob("*")):
            if p.suffix.lower() in ADAPTER_SUFFIXES and p.is_file():
                out.append((f"{p.name}  ({folder.name})", str(p)))
                if len(out) >= LIST_LIMIT:
                    return out
    return out


def _output_name(name: str, default: str) -> str:
    stem = Path((name or "").strip() or default).name
    if stem.lower().endswith(".safetensors"):
        stem = stem[: -len(".safetensors")]
    if not stem or stem.startswith("."):
        raise StudioError("The output name is empty.", "Type a name such as my-blend.")
    return stem + ".safetensors"


def collect_inputs(ctx, paths, weights, blocks_text: str = ""):
    """MergeInputs from the picked rows (empty rows and zero weights skipped), paths checked."""
    from studio.merge.blend import MergeInput, parse_blocks

    blocks = parse_blocks(blocks_text)
    inputs = []
    for path, weight in zip(paths, weights):
        if not path or weight is None:
            continue
        safe = ctx.safe_path(path, must_exist=True)
        inputs.append(MergeInput(safe, float(weight), blocks))
    if not inputs:
        raise StudioError("No adapters picked.", "Pick at least one adapter and give it a weight.")
    return inputs


def run_merge(ctx, paths, weights, method_label: str, rank, energy, blocks_text: str, bake_into: bool,
              base_model: str, out_name: str, dtype_name: str, progress=None) -> tuple[str, str]:
    """Returns (markdown report, output path)."""
    import torch

    from studio.jobs import GPU
    from studio.merge.recipe import describe_recipe

    inputs = collect_inputs(ctx, paths, weights, blocks_text)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name or "fp16"]
    cb = (lambda frac, name: progress(frac, desc=name)) if progress else None
    with GPU.job("merge", out_name or "merge", wait=False):
        if bake_into:
            from studio.merge.bake import bake

            base = ctx.safe_path(base_model, must_exist=True)
            if base.suffix.lower() != ".safetensors":
                raise StudioError("Baking needs a single-file .safetensors base model.",
                                  "Pick a checkpoint from your webUI folders in the base-model list.")
            folder = Path(ctx.workspace.checkpoints)
            out = ctx.safe_path(folder / _output_name(out_name, f"{base.stem}-baked"))
            res = bake(base, inputs, out, dtype, cb)
        else:
            from studio.merge.lora_merge import merge_adapters

            method = METHODS.get(method_label, "concat")
            folder = Path(ctx.workspace.loras)
            out = ctx.safe_path(folder / _output_name(out_name, "merged"))
            if method == "concat":
                res = merge_adapters(inputs, out, "concat", dtype=dtype, progress=cb)
            elif method == "svd":
                res = merge_adapters(inputs, out, "svd", int(rank), dtype=dtype, progress=cb)
            else:
                res = merge_adapters(inputs, out, "svd", int(rank) if rank else None, float(energy), dtype=dtype,
                                     progress=cb)
    text = f"{res.summary()}\n\n```\n{describe_recipe(res.recipe)}\n```\n\nSaved to `{res.path}`."
    return text, str(res.path)


def preview(ctx, paths, weights, blocks_text: str, merged: str, base_model: str, prompt: str, seed) -> list:
    """One image with the inputs applied at run time, one with the merged file (same prompt / seed)."""
    try:
        from studio.generate.engine import AdapterChoice, GenerateRequest, generate
    except ImportError as err:  # pragma: no cover - the Generate engine ships with the studio
        raise StudioError("The preview needs the Generate engine.", "Update the studio.") from err
    if not merged:
        raise StudioError("Nothing merged yet.", "Merge first, then preview.")
    inputs = collect_inputs(ctx, paths, weights, blocks_text)
    merged_path = ctx.safe_path(merged, must_exist=True)
    from studio.fileio import read_safetensors_header

    if any(k.startswith("model.diffusion_model.") for k in read_safetensors_header(merged_path).tensors):
        raise StudioError("The preview compares LoRAs; a baked checkpoint is previewed by picking it as the "
                          "base model in Generate.", "Use the Generate tab.")
    seed = int(seed) if seed not in (None, "") else 1
    common = dict(model=base_model, prompt=prompt or "a photo", seed=seed, steps=20, save=False)
    a = generate(GenerateRequest(adapters=[AdapterChoice(str(i.path), i.weight) for i in inputs], **common))
    b = generate(GenerateRequest(adapters=[AdapterChoice(str(merged_path), 1.0)], **common))
    return [(a.images[0], "inputs at run time"), (b.images[0], "merged file")]


# --- layout ---------------------------------------------------------------------------------------

def build(ctx) -> None:
    gr.Markdown("Blend adapters of one model family by weight (negative weights subtract). **Exact** keeps every "
                "input's effect bit for bit (rank = sum of ranks); **SVD** gives the best approximation at a "
                "smaller rank; **bake** writes a new checkpoint with the adapters inside.")
    choices = adapter_choices(ctx)
    rows, pickers, sliders = [], [], []
    count = gr.State(2)
    for i in range(MAX_INPUTS):
        with gr.Row(visible=i < 2, equal_height=True) as row:
            pickers.append(gr.Dropdown(choices=choices, label=f"Adapter {i + 1}", allow_custom_value=True, scale=5))
            sliders.append(gr.Slider(-2.0, 2.0, value=1.0, step=0.05, label="Weight", scale=3))
        rows.append(row)
    with gr.Row():
        add = gr.Button("Add adapter", size="sm")
        rescan = gr.Button("Rescan adapter folders", size="sm")
    with gr.Row():
        method = gr.Radio(list(METHODS), value=next(iter(METHODS)), label="Method")
        rank = gr.Number(value=32, precision=0, minimum=1, label="Rank (SVD; most for dynamic)")
        energy = gr.Slider(0.5, 1.0, value=0.9, step=0.01, label="Energy to keep (dynamic)")
    blocks = gr.Textbox(label="Per-block weights (optional)", placeholder="te=0.5, in=1, mid=0, out=0.8, out4=0.3",
                        info="Multiplies each input's weight by block: te / te1 / te2, in / in0..in11, mid, "
                             "out / out0..out11 (SGM numbering), unet.")
    with gr.Row():
        bake_box = gr.Checkbox(label="Bake into the base model (writes a checkpoint)", value=False)
        out_name = gr.Textbox(label="Output name", placeholder="my-blend")
        dtype = gr.Dropdown(["fp16", "bf16", "fp32"], value="fp16", label="Precision")
    go = gr.Button("Merge", variant="primary")
    report = gr.Markdown()
    out_path = gr.Textbox(label="Result", interactive=False)
    with gr.Row():
        open_inspect = gr.Button("Open in Inspect", size="sm")
    with gr.Accordion("Preview (one prompt, one seed)", open=False):
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", value="a photo", scale=4)
            seed = gr.Number(value=1, precision=0, label="Seed", scale=1)
        preview_btn = gr.Button("Render inputs vs merge")
        gallery = gr.Gallery(label="Preview", columns=2, height=320)

    def _add(n):
        n = min(MAX_INPUTS, int(n) + 1)
        return [n] + [gr.update(visible=i < n) for i in range(MAX_INPUTS)]

    add.click(_add, count, [count, *rows])
    rescan.click(lambda: [gr.update(choices=adapter_choices(ctx)) for _ in pickers], None, pickers)

    def _merge(*args, progress=gr.Progress()):
        paths, weights = args[:MAX_INPUTS], args[MAX_INPUTS:2 * MAX_INPUTS]
        m, r, e, b, bk, base, name, dt = args[2 * MAX_INPUTS:]
        try:
            return run_merge(ctx, paths, weights, m, r, e, b, bk, base, name, dt, progress)
        except StudioError as err:
            return _error(err), ""

    go.click(_merge, [*pickers, *sliders, method, rank, energy, blocks, bake_box, ctx.model_picker, out_name, dtype],
             [report, out_path])

    def _preview(*args):
        paths, weights = args[:MAX_INPUTS], args[MAX_INPUTS:2 * MAX_INPUTS]
        b, merged, base, p, s = args[2 * MAX_INPUTS:]
        try:
            return preview(ctx, paths, weights, b, merged, base, p, s)
        except StudioError as err:
            raise gr.Error(str(err)) from err

    preview_btn.click(_preview, [*pickers, *sliders, blocks, out_path, ctx.model_picker, prompt, seed], gallery)

    def _wire_inspect():
        target = ctx.components.get("inspect_path")
        if target is None or ctx.tabs is None:
            open_inspect.click(lambda: gr.Info("The Inspect tab is not available."), None, None)
            return
        open_inspect.click(lambda p: (p, gr.Tabs(selected="inspect")), out_path, [target, ctx.tabs])

    ctx.on_built.append(_wire_inspect)
