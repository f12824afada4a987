"""Captioners behind one interface, and the batched, cancellable loop that runs them.

- ``template``: trigger word + class word + words from the folder and file names. No model;
  always works offline.
- ``blip``: BLIP image captioning (transformers), sentences.
- ``wd14``: a WD14-style booru tagger (ONNX, through the optional ``onnxruntime``), tags.
- ``florence2``: Florence-2 through transformers' native classes (no remote code), sentences.

Model captioners take a hub id or a local folder. A hub id is downloaded on first use (the hub's
progress bars show; the UI picks them up); offline and not downloaded yet is a clear StudioError.
``caption_dataset`` loads each image the way training will, captions in batches, writes each
caption atomically as soon as it exists, and can be cancelled between batches: captions written so
far stay, and the next run skips them unless asked to overwrite.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from studio.dataset.captions import add_trigger, dedupe_tags, join_tags, write_caption
from studio.dataset.checks import Problem
from studio.dataset.images import ImageRefused, load_image
from studio.dataset.scan import Dataset, DatasetItem
from studio.errors import StudioError

DEFAULT_MODELS = {
    "blip": "Salesforce/blip-image-captioning-large",
    "wd14": "SmilingWolf/wd-vit-tagger-v3",
    "florence2": "florence-community/Florence-2-base",
}
Progress = Callable[[int, int, str], None]  # (done, total, message)


# --- the interface --------------------------------------------------------------------------------

class Captioner:
    """Turns a batch of RGB images into captions. Subclasses set ``name`` and implement ``caption``."""

    name = "captioner"
    needs_model = True

    def __init__(self, trigger: str = "", class_word: str = "", model: str | None = None,
                 device: str | None = None, **options):
        self.trigger = trigger.strip()
        self.class_word = class_word.strip()
        self.model = model or DEFAULT_MODELS.get(self.name, "")
        self.device = device or "auto"
        self.options = options

    @property
    def uses_gpu(self) -> bool:
        return self.device.startswith("cuda")

    def load(self) -> None:
        """Load (and on first use download) the model. Called once before the first batch."""

    def caption(self, images: list, items: list[DatasetItem]) -> list[str]:
        raise NotImplementedError

    def finish(self, text: str) -> str:
        """The trigger word goes first, so every caption teaches it."""
        text = " ".join(text.split())
        return add_trigger(text, self.trigger) if text and self.trigger else text

    def unload(self) -> None:
        """Free the model's memory."""


def pick_device(device: str | None = "auto") -> str:
    if device and device != "auto":
        return device
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_model(model: str, what: str, allow_patterns: list[str] | None = None) -> Path:
    """A local folder as is; a hub id from the cache, downloaded on first use."""
    local = Path(model).expanduser()
    if local.exists():
        return local
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", model):
        raise StudioError(f"The {what} model {model!r} is neither a folder nor a hub id (owner/name).",
                          "Give a folder that holds the model, or a hub id such as "
                          f"{DEFAULT_MODELS.get(what, 'owner/name')}.")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, local_files_only=True, allow_patterns=allow_patterns))
    except Exception:
        pass  # not in the cache yet: download it below
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if offline:
        raise StudioError(f"The {what} model {model} is not downloaded yet, and the studio is offline "
                          "(HF_HUB_OFFLINE is set).",
                          "Connect to the internet once so it can be downloaded, use the template captioner, "
                          "or download the model elsewhere and pass its folder.")
    try:
        return Path(snapshot_download(model, allow_patterns=allow_patterns))
    except Exception as err:
        raise StudioError(f"Could not download the {what} model {model}: {str(err).splitlines()[0][:200]}",
                          "Check the internet connection and the model id, or use the template captioner, "
                          "which needs no model.") from err


# --- template -------------------------------------------------------------------------------------

# Words in file names that describe the camera or the export, not the picture.
_NOISE_WORDS = {"img", "image", "dsc", "dscn", "dscf", "pxl", "photo", "pic", "picture", "screenshot", "copy",
                "edit", "edited", "final", "scan", "untitled", "jpg", "png", "webp", "mvimg", "dji", "gopr"}


def name_words(name: str) -> list[str]:
    """The meaningful words of a file or folder name: "IMG_2041_red-ball (2)" -> ["red", "ball"]."""
    words = re.split(r"[^A-Za-z]+", re.sub(r"([a-z])([A-Z])", r"\1 \2", name))
    return [w.lower() for w in words if len(w) > 1 and w.lower() not in _NOISE_WORDS]


class TemplateCaptioner(Captioner):
    """``trigger, class, folder words, file words``: no model, instant, always offline."""

    name = "template"
    needs_model = False

    def caption(self, images: list, items: list[DatasetItem]) -> list[str]:
        return [self.caption_for(item) for item in items]

    def caption_for(self, item: DatasetItem) -> str:
        used = set(self.trigger.lower().split()) | set(self.class_word.lower().split())
        tags = [self.trigger, self.class_word]
        for phrase_words in (name_words(item.class_tokens), name_words(item.image_path.stem)):
            fresh = [w for w in phrase_words if w not in used]
            used.update(fresh)
            tags.append(" ".join(fresh))
        return dedupe_tags(join_tags(t for t in tags if t))

    def finish(self, text: str) -> str:
        return " ".join(text.split())  # the trigger is already first


# --- BLIP -----------------------------------------------------------------------------------------

class _TorchCaptioner(Captioner):
    def _torch_setup(self):
        import torch

        self.device = pick_device(self.device)
        self.dtype = torch.float16 if self.device.startswith("cuda") else torch.float32

    def unload(self) -> None:
        self._model = None
        self._processor = None
        with contextlib.suppress(Exception):
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()


class BlipCaptioner(_TorchCaptioner):
    """BLIP (BlipForConditionalGeneration). ``model``: a hub id or a folder saved by transformers."""

    name = "blip"

    def load(self) -> None:
        from transformers import BlipForConditionalGeneration, BlipProcessor

        self._torch_setup()
        path = resolve_model(self.model, "blip")
        try:
            self._processor = BlipProcessor.from_pretrained(path)
            self._model = BlipForConditionalGeneration.from_pretrained(path, dtype=self.dtype).to(self.device).eval()
        except (OSError, ValueError) as err:
            raise StudioError(f"{self.model} could not be loaded as a BLIP captioning model: "
                              f"{str(err).splitlines()[0][:200]}",
                              "Point at a folder or hub id of a BLIP image-captioning model.") from err

    def caption(self, images: list, items: list[DatasetItem]) -> list[str]:
        import torch

        prompt = self.options.get("prompt")  # BLIP can continue a prompt ("a photo of")
        inputs = self._processor(images=images, text=[prompt] * len(images) if prompt else None,
                                 return_tensors="pt")
        inputs = inputs.to(self.device, self.dtype)
        with torch.inference_mode():
            out = self._model.generate(**inputs, max_new_tokens=int(self.options.get("max_new_tokens", 40)),
                                       num_beams=int(self.options.get("num_beams", 1)))
        return self._processor.batch_decode(out, skip_special_tokens=True)


# --- Florence-2 -----------------------------------------------------------------------------------

class Florence2Captioner(_TorchCaptioner):
    """Florence-2 through transformers' native classes (no ``trust_remote_code``)."""

    name = "florence2"
    TASKS = {"short": "<CAPTION>", "detailed": "<DETAILED_CAPTION>", "more_detailed": "<MORE_DETAILED_CAPTION>"}

    def load(self) -> None:
        import transformers

        if not hasattr(transformers, "Florence2ForConditionalGeneration"):
            raise StudioError(f"Florence-2 is not available in this transformers version "
                              f"({transformers.__version__}); the studio does not run remote model code.",
                              "Upgrade transformers, or use the blip, wd14 or template captioner.")
        self._torch_setup()
        path = resolve_model(self.model, "florence2")
        try:
            self._processor = transformers.AutoProcessor.from_pretrained(path)
            model = transformers.Florence2ForConditionalGeneration.from_pretrained(path, dtype=self.dtype)
        except Exception as err:  # OSError, ValueError, config validation, weights of the wrong shape (RuntimeError)
            raise StudioError(f"{self.model} could not be loaded as a native Florence-2 model: "
                              f"{str(err).splitlines()[0][:200]}",
                              "Use a checkpoint converted for transformers, such as "
                              f"{DEFAULT_MODELS['florence2']}.") from err
        self._model = model.to(self.device).eval()  # out of memory here is not a conversion problem

    def caption(self, images: list, items: list[DatasetItem]) -> list[str]:
        import torch

        task = self.TASKS.get(self.options.get("detail", "detailed"), "<DETAILED_CAPTION>")
        inputs = self._processor(text=[task] * len(images), images=images, return_tensors="pt")
        inputs = inputs.to(self.device, self.dtype)
        with torch.inference_mode():
            out = self._model.generate(**inputs, max_new_tokens=int(self.options.get("max_new_tokens", 80)),
                                       num_beams=int(self.options.get("num_beams", 3)))
        return self._processor.batch_decode(out, skip_special_tokens=True)


# --- WD14 tagger ----------------------------------------------------------------------------------

# Kaomoji tags keep their underscores ("^_^"); other tags read better with spaces.
_KAOMOJI = {"0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o", "@_@",
            "^_^", "o_o", "u_u", "x_x", "|_|", "||_||"}


class Wd14Captioner(Captioner):
    """A WD14-style tagger: ``model.onnx`` (NHWC, BGR, 0-255 input) + ``selected_tags.csv``."""

    name = "wd14"

    def load(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise StudioError("The wd14 tagger needs onnxruntime, which is not installed.",
                              "Install it with `pip install onnxruntime` (or onnxruntime-gpu), or use the blip "
                              "or template captioner.") from err
        import csv

        path = resolve_model(self.model, "wd14", allow_patterns=["*.onnx", "*.csv", "*.json"])
        onnx_file = path if path.suffix == ".onnx" else path / "model.onnx"
        tags_file = onnx_file.parent / "selected_tags.csv"
        if not onnx_file.is_file() or not tags_file.is_file():
            raise StudioError(f"{path} does not hold model.onnx and selected_tags.csv.",
                              "Point at a WD14 tagger folder such as the one of SmilingWolf/wd-vit-tagger-v3.")
        with open(tags_file, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        self._tags = [r["name"] if r["name"] in _KAOMOJI else r["name"].replace("_", " ") for r in rows]
        self._categories = [int(r.get("category", 0)) for r in rows]
        providers = ["CPUExecutionProvider"]
        if pick_device(self.device).startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
            self.device = "cuda"
        self._session = ort.InferenceSession(str(onnx_file), providers=providers)
        inp = self._session.get_inputs()[0]
        self._input_name = inp.name
        self._side = int(inp.shape[1])
        self._fixed_batch = isinstance(inp.shape[0], int)

    def _prepare(self, image):
        import numpy as np
        from PIL import Image

        side = max(image.size)
        square = Image.new("RGB", (side, side), (255, 255, 255))
        square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        square = square.resize((self._side, self._side), Image.Resampling.BICUBIC)
        return np.asarray(square, dtype=np.float32)[:, :, ::-1]  # RGB -> BGR

    def caption(self, images: list, items: list[DatasetItem]) -> list[str]:
        import numpy as np

        batch = np.stack([self._prepare(im) for im in images])
        if self._fixed_batch:
            probs = np.concatenate([self._session.run(None, {self._input_name: batch[i:i + 1]})[0]
                                    for i in range(len(batch))])
        else:
            probs = self._session.run(None, {self._input_name: batch})[0]
        general = float(self.options.get("threshold", 0.35))
        character = float(self.options.get("character_threshold", 0.85))
        out = []
        for row in probs:
            picked = [(p, t) for p, t, c in zip(row, self._tags, self._categories)
                      if (c == 0 and p >= general) or (c == 4 and p >= character)]  # 9 = rating: left out
            out.append(join_tags(t for _, t in sorted(picked, key=lambda pt: -pt[0])))
        return out

    def unload(self) -> None:
        self._session = None


CAPTIONERS: dict[str, type[Captioner]] = {
    "template": TemplateCaptioner, "blip": BlipCaptioner, "wd14": Wd14Captioner, "florence2": Florence2Captioner,
}


def get_captioner(name: str, **kwargs) -> Captioner:
    try:
        return CAPTIONERS[name](**kwargs)
    except KeyError:
        raise StudioError(f"Unknown captioner {name!r}.", f"Choose one of: {', '.join(CAPTIONERS)}.") from None


# --- the loop -------------------------------------------------------------------------------------

@dataclass
class CaptionReport:
    total: int = 0  # images considered
    written: int = 0
    skipped: int = 0  # already had a caption
    failed: list[Problem] = field(default_factory=list)
    cancelled: bool = False
    seconds: float = 0.0  # captioning time: loading images, the model's work, writing captions
    load_seconds: float = 0.0  # loading (and on first use downloading) the model

    @property
    def images_per_second(self) -> float:
        return self.written / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        parts = [f"captioned {self.written}", f"skipped {self.skipped} that already had captions"]
        if self.failed:
            parts.append(f"{len(self.failed)} failed")
        text = ", ".join(parts) + f" ({self.seconds:.1f} s)"
        return ("Cancelled: " + text + "; run again to continue.") if self.cancelled else text.capitalize()


def _cancelled(cancel) -> bool:
    if cancel is None:
        return False
    return bool(cancel.is_set() if hasattr(cancel, "is_set") else cancel())


def caption_dataset(items: Dataset | Iterable[DatasetItem], captioner: Captioner, batch_size: int = 8,
                    overwrite: bool = False, progress: Progress | None = None, cancel=None,
                    background: tuple[int, int, int] = (255, 255, 255), wait_for_gpu: bool = True) -> CaptionReport:
    """Caption the items that have no caption yet (all of them with ``overwrite``).

    ``cancel``: a ``threading.Event`` (or a callable returning True) checked between batches.
    ``progress(done, total, message)`` is called after each batch.
    """
    from studio.jobs import GPU

    items = list(items.items if isinstance(items, Dataset) else items)
    report = CaptionReport(total=len(items))
    todo = [i for i in items if overwrite or not i.caption.strip()]
    report.skipped = len(items) - len(todo)
    start = time.perf_counter()
    if not todo:
        return report
    if progress:
        progress(0, len(todo), f"loading the {captioner.name} captioner")
    captioner.load()
    report.load_seconds = time.perf_counter() - start
    start = time.perf_counter()
    gate = GPU.job("caption", f"{captioner.name} captioning", wait=wait_for_gpu) if captioner.uses_gpu \
        else contextlib.nullcontext()
    batch_size = max(1, int(batch_size))
    done = 0
    with gate:
        for at in range(0, len(todo), batch_size):
            if _cancelled(cancel):
                report.cancelled = True
                break
            batch, images = [], []
            for item in todo[at:at + batch_size]:
                try:
                    images.append(load_image(item.image_path, background))
                    batch.append(item)
                except (ImageRefused, OSError) as err:
                    report.failed.append(Problem(item.image_path, f"could not be loaded: {err}"))
            texts = _run_batch(captioner, images, batch) if batch else []
            for item, text in zip(batch, texts):
                text = captioner.finish(text)
                if not text:
                    report.failed.append(Problem(item.image_path, f"the {captioner.name} captioner returned no "
                                                                  "text for it"))
                    continue
                write_caption(item.image_path, text)
                item.caption = text
                report.written += 1
            done += len(todo[at:at + batch_size])
            report.seconds = time.perf_counter() - start
            if progress:
                progress(done, len(todo), f"{done}/{len(todo)} images")
    report.seconds = time.perf_counter() - start
    return report


def _run_batch(captioner: Captioner, images: list, batch: list[DatasetItem]) -> list[str]:
    try:
        return captioner.caption(images, batch)
    except StudioError:
        raise
    except Exception as err:
        if type(err).__name__ == "OutOfMemoryError":
            raise StudioError(f"The GPU ran out of memory while captioning with {captioner.name}.",
                              "Lower the batch size, or close other programs that use the GPU.") from err
        raise
