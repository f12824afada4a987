"""The Inspect tab: pick or drop an adapter / embedding file and see what it is.

Other tabs open a file here by setting ``ctx.components["inspect_path"]`` and selecting the tab
with id ``inspect``; a change of that path runs the inspection.
"""

from __future__ import annotations

import gradio as gr


def summary_markdown(r: dict) -> str:
    """The report as Markdown (also used by tests)."""
    fam = r["family"] or "unknown"
    lines = [f"### {r['name']}",
             f"**{r['kind']}** · format **{r['format']}** · family **{fam}**"
             + (f" (from {r['family_source']})" if r.get("family_source") else ""),
             f"Size {r['size'] / 1e6:.2f} MB · {r['n_tensors']} tensors · {r['dtype']} · "
             f"hash `{r['short_hash'] or '-'}` (as A1111 shows it)"]
    if r.get("embedding"):
        e = r["embedding"]
        lines.append(f"Token `{e['token']}` · {e['n_vectors']} vector(s) · {e['vectors']}")
    else:
        m = r["modules"]
        lines.append(f"Modules: UNet **{m['unet']}** · TE1 **{m['te1']}** · TE2 **{m['te2']}**")
        rank, alpha = r["rank"], r["alpha"]
        fmt = (lambda v: f"mixed {v['min']}–{v['max']} (mostly {v['most_common']})" if isinstance(v, dict) else str(v))
        lines.append(f"Rank {fmt(rank)} · alpha {fmt(alpha)}")
    if r["trigger_words"]:
        lines.append("Trigger words: " + ", ".join(f"`{t}`" for t in r["trigger_words"]))
    if r["tag_frequency"]:
        lines.append("Top tags: " + ", ".join(f"{t} ({n})" for t, n in list(r["tag_frequency"].items())[:15]))
    if r["dataset_dirs"]:
        lines.append("Dataset: " + ", ".join(f"{d} ({v.get('img_count', '?')} images × {v.get('n_repeats', '?')})"
                                            if isinstance(v, dict) else d for d, v in r["dataset_dirs"].items()))
    if r["training"]:
        lines.append("Training: " + ", ".join(f"{k} = {v}" for k, v in r["training"].items()))
    if r.get("merge_recipe"):
        from studio.merge.recipe import describe_recipe

        lines.append("Merged from:\n```\n" + describe_recipe(r["merge_recipe"]) + "\n```")
    if r["modelspec"]:
        lines.append("ModelSpec: " + ", ".join(f"{k} = {v}" for k, v in r["modelspec"].items()))
    if r["warnings"]:
        lines.append("#### Warnings\n" + "\n".join(f"- ⚠️ {w}" for w in r["warnings"]))
    else:
        lines.append("No problems found.")
    return "\n\n".join(lines)


def norms_figure(r: dict):
    norms = r.get("block_norms") or []
    if not norms:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3))
    labels, values = zip(*norms)
    colors = ["tab:blue" if not l.startswith("TE") else "tab:orange" for l in labels]
    ax.bar(range(len(values)), values, color=colors)
    ax.set_xticks(range(len(values)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("‖ΔW‖ per block")
    fig.tight_layout()
    return fig


def run_inspect(path: str | None, deep: bool = True):
    """(markdown, metadata dict, figure) for the UI; errors become a message, never a traceback."""
    if not path:
        return "Choose or drop a file.", {}, None
    from studio.adapters.inspect import inspect_file
    from studio.errors import StudioError

    try:
        r = inspect_file(path, deep=deep)
    except StudioError as err:
        return f"**Cannot inspect this file.** {err.message}" + (f"\n\n{err.fix}" if err.fix else ""), {}, None
    return summary_markdown(r), r["metadata"], norms_figure(r)


def build(ctx) -> None:
    gr.Markdown("Open a LoRA / LyCORIS / embedding file to see what it is and whether webUIs will load it.")
    with gr.Row():
        upload = gr.File(label="Drop a file", file_types=[".safetensors", ".pt", ".bin", ".ckpt"], type="filepath")
        with gr.Column():
            path = gr.Textbox(label="…or a path on this machine", placeholder="/path/to/adapter.safetensors")
            deep = gr.Checkbox(value=True, label="Read the tensors too (NaN/Inf check, norm plot, real hash)")
            go = gr.Button("Inspect", variant="primary")
    summary = gr.Markdown()
    plot = gr.Plot(label="Delta norm per block")
    with gr.Accordion("All metadata", open=False):
        meta = gr.JSON()
    ctx.components["inspect_path"] = path
    def checked_inspect(p, d):
        from studio.errors import StudioError

        try:
            if p:
                ctx.safe_path(p)  # a path from the browser: only inside the studio's folders
        except StudioError as err:
            return f"**Cannot inspect this file.** {err.message}" + (f"\n\n{err.fix}" if err.fix else ""), {}, None
        return run_inspect(p, d)

    upload.upload(lambda f: f, upload, path)
    path.change(checked_inspect, [path, deep], [summary, meta, plot])
    go.click(checked_inspect, [path, deep], [summary, meta, plot])
