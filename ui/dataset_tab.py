"""The Dataset tab: bring images in, check them, caption them, edit captions, see the buckets.

Thin by design: every handler below calls ``studio.dataset`` and only formats the result. The
handlers are plain module functions so tests can call them without a browser.
"""

from __future__ import annotations

import threading
from pathlib import Path

import gradio as gr

from studio.errors import StudioError

GALLERY_LIMIT = 300  # thumbnails shown at once; captions of all images are still edited by bulk ops
_cancel = threading.Event()  # one captioning job at a time (the GPU gate enforces it too)


def _scan(path: str, reg: str = ""):
    from studio.dataset import scan_dataset

    if not path:
        raise StudioError("No dataset chosen.", "Bring a folder, zip or images in first, or pick a dataset.")
    return scan_dataset(path, reg_dir=reg or None)


def _error(err: StudioError) -> str:
    return f"**{err.message}**" + (f"\n\n{err.fix}" if err.fix else "")


# --- handlers (plain functions) ---------------------------------------------------------------------

def dataset_choices(workspace) -> list[str]:
    from studio.dataset.importer import list_datasets

    return [str(p) for p in list_datasets(workspace)]


def bring_in(workspace, files, folder: str, mode: str, name: str) -> tuple[str, str]:
    """Returns (dataset path, message)."""
    from studio.dataset import importer

    if files:
        paths = [getattr(f, "name", f) for f in files]
        if len(paths) == 1 and str(paths[0]).lower().endswith(".zip"):
            target = importer.import_zip(paths[0], workspace, name or None)
        else:
            target = importer.import_files(paths, workspace, name or "upload")
        return str(target), f"Copied into the workspace as **{target.name}**."
    if not folder:
        raise StudioError("Nothing to bring in.", "Drop images or a zip, or type a folder path.")
    if mode.startswith("Use in place"):
        target = importer.use_in_place(folder, workspace)
        return str(target), (f"Using **{target}** in place. Your images are only read; captions you write are "
                             "saved as .txt files in that folder.")
    target = importer.import_folder(folder, workspace, name or None)
    return str(target), f"Copied into the workspace as **{target.name}**; the original folder is unchanged."


def check(path: str, reg: str = "") -> tuple[str, list[list[str]]]:
    """Returns (summary, rows of [file, severity, reason])."""
    ds = _scan(path, reg)
    rows = []
    for p in ds.problems:
        try:
            name = str(p.path.relative_to(ds.root))
        except ValueError:
            name = str(p.path)
        rows.append([name, p.severity, p.reason])
    converted = sum(1 for i in ds.items if i.notes)
    summary = (f"**{len(ds.items)}** images ready ({len(ds.reg_items)} regularisation), **{len(ds.errors)}** left "
               f"out, **{len(ds.warnings)}** warnings, {converted} converted when loaded (rotation, transparency, "
               "colour mode). Files left out are not deleted.")
    if not ds.items and not ds.problems:
        summary = "No images found in this folder."
    return summary, rows


def caption(path: str, reg: str, captioner_name: str, model: str, trigger: str, class_word: str, overwrite: bool,
            batch_size: int, progress=None) -> str:
    from studio.dataset.captioners import caption_dataset, get_captioner

    ds = _scan(path, reg)
    captioner = get_captioner(captioner_name, trigger=trigger, class_word=class_word, model=model.strip() or None)
    _cancel.clear()

    def report_progress(done, total, message):
        if progress is not None:
            progress((done, total), desc=message)

    report = caption_dataset(ds, captioner, batch_size=int(batch_size), overwrite=overwrite,
                             progress=report_progress, cancel=_cancel, wait_for_gpu=False)
    captioner.unload()
    lines = [report.summary()] + [f"- {p.path.name}: {p.reason}" for p in report.failed]
    return "\n".join(lines)


def cancel() -> str:
    _cancel.set()
    return "Cancelling after the current batch…"


def gallery(path: str, reg: str = ""):
    """Returns (thumbnails with captions, image paths) for the first GALLERY_LIMIT images."""
    from studio.dataset import load_image

    ds = _scan(path, reg)
    shown, paths = [], []
    for item in ds.items[:GALLERY_LIMIT]:
        thumb = load_image(item.image_path)
        thumb.thumbnail((256, 256))
        shown.append((thumb, item.caption or "(no caption)"))
        paths.append(str(item.image_path))
    return shown, paths


def save_caption(image_path: str, text: str) -> str:
    from studio.dataset.captions import write_caption

    if not image_path:
        raise StudioError("No image selected.", "Click an image in the gallery first.")
    write_caption(Path(image_path), text)
    return f"Saved {Path(image_path).with_suffix('.txt').name}."


def bulk(path: str, reg: str, op: str, a: str = "", b: str = "", flag: bool = False) -> str:
    from studio.dataset import captions as C

    ds = _scan(path, reg)
    edits = {
        "trigger": lambda c: C.add_trigger(c, a, at_end=flag),
        "replace": lambda c: C.find_replace(c, a, b, regex=flag),
        "remove": lambda c: C.remove_tags(c, a.split(",")),
        "dedupe": C.dedupe_tags,
    }
    try:
        changed = C.apply(ds.items, edits[op])
    except Exception as err:  # a bad regular expression, typically
        if isinstance(err, StudioError):
            raise
        raise StudioError(f"The edit failed: {err}", "Check the find pattern.") from err
    return f"Changed {changed} of {len(ds.items)} captions."


def tag_rows(path: str, reg: str = "") -> list[list]:
    from studio.dataset.captions import tag_table

    return [[tag, n] for tag, n in tag_table(_scan(path, reg))]


def buckets(path: str, reg: str, resolution: int, step: int) -> str:
    from studio.dataset.buckets import bucket_histogram

    ds = _scan(path, reg)
    hist = bucket_histogram([i.size for i in ds.items], int(resolution), int(step),
                            repeats=[i.repeats for i in ds.items])
    if not hist:
        return "No images to bucket."
    top = max(hist.values())
    lines = [f"{w:>5} x {h:<5} {n:>6}  {'█' * max(1, round(30 * n / top))}" for (w, h), n in hist.items()]
    return "Images per bucket (times repeats):\n```\n" + "\n".join(lines) + "\n```"


# --- layout -----------------------------------------------------------------------------------------

def _safe(fn):
    """Show a StudioError in the tab instead of a stack trace."""
    def wrapped(*args):
        try:
            return fn(*args)
        except StudioError as err:
            raise gr.Error(str(err)) from err
    wrapped.__name__ = getattr(fn, "__name__", "handler")
    return wrapped


def build(ctx) -> None:
    ws = ctx.workspace
    gr.Markdown("A dataset is a folder of images with same-name `.txt` captions. Kohya subfolders "
                "`N_name` repeat their images N times; a `reg` subfolder holds regularisation images.")
    with gr.Accordion("1. Bring images in", open=True):
        with gr.Row():
            files = gr.File(file_count="multiple", file_types=["image", ".zip", ".txt"],
                            label="Drop images (with their .txt captions) or one zip")
            with gr.Column():
                folder = gr.Textbox(label="…or a folder on this computer", placeholder="/path/to/images",
                                    info="It must be inside the workspace or a folder listed in Settings.")
                mode = gr.Radio(["Copy into the workspace", "Use in place (captions are written into that folder)"],
                                value="Copy into the workspace", label="How")
                name = gr.Textbox(label="Name in the workspace (optional)")
                bring = gr.Button("Bring in", variant="primary")
        bring_msg = gr.Markdown()
    with gr.Row(equal_height=True):
        dataset = gr.Dropdown(choices=dataset_choices(ws), label="Dataset", allow_custom_value=True, scale=6)
        reg = gr.Textbox(label="Regularisation folder (optional; a `reg` subfolder is found by itself)", scale=4)
        rescan = gr.Button("Refresh", size="sm", scale=1)

    with gr.Accordion("2. Check", open=True):
        check_btn = gr.Button("Check images")
        check_summary = gr.Markdown()
        problems = gr.Dataframe(headers=["file", "severity", "reason"], interactive=False, wrap=True)

    with gr.Accordion("3. Caption", open=False):
        with gr.Row():
            captioner = gr.Dropdown(["template", "blip", "wd14", "florence2"], value="template", label="Captioner",
                                    info="template: trigger + class + words from names, no download. blip / "
                                         "florence2: sentences. wd14: booru tags (needs onnxruntime).")
            model = gr.Textbox(label="Model (hub id or folder; blank = default)")
            trigger = gr.Textbox(label="Trigger word", placeholder="sks")
            class_word = gr.Textbox(label="Class word", placeholder="dog")
        with gr.Row():
            overwrite = gr.Checkbox(label="Overwrite existing captions", value=False)
            batch = gr.Slider(1, 64, value=8, step=1, label="Batch size")
            run = gr.Button("Caption", variant="primary")
            stop = gr.Button("Cancel", variant="stop")
        caption_msg = gr.Markdown()

    with gr.Accordion("4. Edit captions", open=False):
        show = gr.Button("Show images")
        pics = gr.Gallery(label=f"Images (first {GALLERY_LIMIT})", columns=6, height=420, allow_preview=False)
        paths = gr.State([])
        with gr.Row():
            selected = gr.Textbox(label="Image", interactive=False, scale=3)
            text = gr.Textbox(label="Caption", scale=6)
            save = gr.Button("Save caption", scale=1)
        with gr.Row():
            bulk_a = gr.Textbox(label="Word / find / tags to remove (comma-separated)")
            bulk_b = gr.Textbox(label="Replace with")
            bulk_flag = gr.Checkbox(label="At the end / regular expression")
        with gr.Row():
            b_trigger = gr.Button("Add trigger word")
            b_replace = gr.Button("Find / replace")
            b_remove = gr.Button("Remove tags")
            b_dedupe = gr.Button("Dedupe tags")
        edit_msg = gr.Markdown()
        tags = gr.Dataframe(headers=["tag", "count"], label="Tag frequency (as saved in the LoRA's metadata)",
                            interactive=False)

    with gr.Accordion("5. Buckets", open=False):
        with gr.Row():
            resolution = gr.Dropdown([512, 768, 1024], value=512, label="Training resolution")
            step = gr.Number(value=64, precision=0, label="Step (px)")
            bucket_btn = gr.Button("Show buckets")
        bucket_out = gr.Markdown()

    # wiring. Every path that comes from the browser is checked against the studio's folders first.
    def _paths(fn, n=2):
        def checked(*args):
            for p in args[:n]:
                if p:
                    ctx.safe_path(p)
            return fn(*args)
        checked.__name__ = fn.__name__
        return checked

    def _bring(f, fo, m, n):
        if fo:
            ctx.safe_path(fo, must_exist=True)
        target, msg = bring_in(ws, f, fo, m, n)
        return gr.update(choices=dataset_choices(ws), value=target), msg

    bring.click(_safe(_bring), [files, folder, mode, name], [dataset, bring_msg])
    rescan.click(lambda: gr.update(choices=dataset_choices(ws)), None, dataset)
    check_btn.click(_safe(_paths(check)), [dataset, reg], [check_summary, problems])

    def _caption(p, r, c, mo, t, cw, ow, bs, progress=gr.Progress(track_tqdm=True)):
        try:  # not wrapped in _safe: gradio finds the progress bar through this signature
            return _paths(caption)(p, r, c, mo, t, cw, ow, bs, progress)
        except StudioError as err:
            raise gr.Error(str(err)) from err

    run.click(_caption, [dataset, reg, captioner, model, trigger, class_word, overwrite, batch], caption_msg)
    stop.click(cancel, None, caption_msg, concurrency_limit=None)

    show.click(_safe(_paths(gallery)), [dataset, reg], [pics, paths])

    def _select(ps, evt: gr.SelectData):
        from studio.dataset import read_caption

        p = ps[evt.index] if evt is not None and evt.index < len(ps) else ""
        return p, read_caption(Path(p)) if p else ""

    pics.select(_select, paths, [selected, text])
    save.click(_safe(_paths(save_caption, 1)), [selected, text], edit_msg)
    for button, op in [(b_trigger, "trigger"), (b_replace, "replace"), (b_remove, "remove"), (b_dedupe, "dedupe")]:
        button.click(_safe(_paths(lambda p, r, a, b, f, op=op: bulk(p, r, op, a, b, f))),
                     [dataset, reg, bulk_a, bulk_b, bulk_flag], edit_msg).then(
            _safe(_paths(tag_rows)), [dataset, reg], tags)
    show.click(_safe(_paths(tag_rows)), [dataset, reg], tags)
    bucket_btn.click(_safe(_paths(buckets)), [dataset, reg, resolution, step], bucket_out)
