"""XY grid: one labelled image of the same generation over one or two axes.

Axes: ``Adapter weight`` and ``Adapter file`` act on the first adapter of the request (a run's
checkpoints as files, times a few weights, is how one picks the best checkpoint), ``Seed``,
``CFG`` and ``Steps``. The whole grid is one GPU job on one resident base model; only the
adapter stack changes between cells.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from studio.errors import StudioError

AXES = ("Adapter weight", "Adapter file", "Seed", "CFG", "Steps")


def parse_values(axis: str, text: str) -> list:
    """``"0.4, 0.8, 1"`` -> numbers; files one per line or comma-separated."""
    if axis not in AXES:
        raise StudioError(f"Unknown XY axis {axis!r}.", f"Use one of: {', '.join(AXES)}.")
    items = [x.strip() for x in str(text).replace("\n", ",").split(",") if x.strip()]
    if not items:
        raise StudioError(f"The {axis} axis has no values.", "Write them separated by commas.")
    if axis == "Adapter file":
        return items
    try:
        return [int(x) if axis in ("Seed", "Steps") else float(x) for x in items]
    except ValueError as err:
        raise StudioError(f"{axis} values must be numbers: {err}.", "Write e.g. 0.4, 0.8, 1.0") from None


def _apply(request, axis: str, value):
    from studio.generate.engine import AdapterChoice

    if axis == "Seed":
        return dataclasses.replace(request, seed=int(value))
    if axis == "CFG":
        return dataclasses.replace(request, cfg=float(value))
    if axis == "Steps":
        return dataclasses.replace(request, steps=int(value))
    adapters = list(request.adapters)
    if axis == "Adapter file":
        first = adapters[0] if adapters else AdapterChoice("", 1.0)
        adapters[:1] = [dataclasses.replace(first, path=str(value))]
    else:
        if not adapters:
            raise StudioError("The Adapter weight axis needs an adapter in the list.", "Add one first.")
        adapters[0] = dataclasses.replace(adapters[0], weight=float(value), te_weight=None)
    return dataclasses.replace(request, adapters=adapters)


def _label(axis: str, value) -> str:
    return f"{axis}: {Path(value).stem if axis == 'Adapter file' else value}"


def draw_grid(images: list[list], x_labels: list[str], y_labels: list[str]):
    """Rows of equal-size images with labels on top and left."""
    from PIL import Image, ImageDraw, ImageFont

    w, h = images[0][0].size
    font = ImageFont.load_default()
    pad = 6
    top = 24
    left = max([0] + [int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(t, font=font)) for t in y_labels]) + 2 * pad
    left = left if any(y_labels) else 0
    grid = Image.new("RGB", (left + w * len(x_labels), top + h * len(images)), "white")
    draw = ImageDraw.Draw(grid)
    for i, label in enumerate(x_labels):
        draw.text((left + i * w + pad, pad), label, fill="black", font=font)
    for j, row in enumerate(images):
        if y_labels[j]:
            draw.text((pad, top + j * h + h // 2), y_labels[j], fill="black", font=font)
        for i, im in enumerate(row):
            grid.paste(im, (left + i * w, top + j * h))
    return grid


@dataclass
class XYResult:
    grid: object
    path: Path | None
    cells: list[list]  # PIL images, rows = y values
    warnings: list[str]


def run_xy(request, x_axis: str, x_values: list, y_axis: str | None = None, y_values: list | None = None,
           callback=None, cancel=None) -> XYResult:
    """Generate every (x, y) cell with request's settings changed along the axes; save the grid."""
    from studio.generate.apply import stack_for
    from studio.generate.engine import _next_paths, _out_dir, resolve_adapters, resolve_seed, txt2img
    from studio.generate.infotext import GenerationParams, format_infotext, save_png
    from studio.jobs import GPU
    from studio.models.loader import MODELS

    y_values = y_values if y_axis else [None]
    request = dataclasses.replace(request, seed=resolve_seed(request.seed), batch=1)
    cells_req = [[_apply(_apply(request, x_axis, x), y_axis, y) if y_axis else _apply(request, x_axis, x)
                  for x in x_values] for y in y_values]
    total = sum(r.steps for row in cells_req for r in row)
    done = 0
    warnings: list[str] = []
    rows = []
    with GPU.job("generate", f"XY grid {x_axis}{' x ' + y_axis if y_axis else ''}"):
        pipe = MODELS.get(request.model, request.device, request.dtype).pipe
        stack = stack_for(pipe)
        try:
            for row_reqs in cells_req:
                row = []
                for r in row_reqs:
                    _, entries, warn, _ = resolve_adapters(r)
                    warnings += [w for w in warn if w not in warnings]
                    stack.set(entries)

                    def step(s, _t, base=done):
                        if callback:
                            callback(base + s, total)

                    row.append(txt2img(pipe, r.prompt, r.negative, r.steps, r.cfg, r.width, r.height, r.seed,
                                       r.sampler, r.clip_skip, 1, step, cancel)[0])
                    done += r.steps
                rows.append(row)
        finally:
            stack.clear()
    grid = draw_grid(rows, [_label(x_axis, x) for x in x_values],
                     [_label(y_axis, y) if y_axis else "" for y in y_values])
    path = None
    if request.save:
        infotext_prompt = resolve_adapters(request)[0] if request.adapters else request.prompt
        params = GenerationParams(prompt=infotext_prompt, negative=request.negative, steps=request.steps,
                                  sampler=request.sampler, cfg=request.cfg, seed=request.seed,
                                  width=rows[0][0].width, height=rows[0][0].height, clip_skip=request.clip_skip,
                                  extra={"X Type": x_axis, "X Values": ", ".join(map(str, x_values)),
                                         **({"Y Type": y_axis, "Y Values": ", ".join(map(str, y_values))}
                                            if y_axis else {})})
        first = _next_paths(_out_dir(request), 1, request.seed)[0]
        path = first.with_name(first.stem + "-grid.png")
        save_png(grid, path, format_infotext(params))
    return XYResult(grid, path, rows, warnings)
