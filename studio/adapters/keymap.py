"""Names: webUI (kohya) adapter names <-> model modules, for SD1.x, SD2.x and SDXL.

A webUI name is a prefix plus the module path with every ``.`` turned into ``_``:

- UNet, SD1/SD2: the diffusers path (``lora_unet_down_blocks_0_attentions_0_..._attn1_to_q``);
- UNet, SDXL: the original SGM path (``lora_unet_input_blocks_4_1_..._attn1_to_q``), via
  ``studio.models.ldm.unet_module_to_sgm`` and the model's own config;
- text encoders: ``lora_te_`` (SD1/SD2), ``lora_te1_`` / ``lora_te2_`` (SDXL), always followed by
  ``text_model_`` even though transformers>=5.6 ``CLIPTextModel`` has no ``text_model.`` level
  (ComfyUI only maps ``lora_te*_text_model_encoder_layers_*``).

``build_keymap`` walks the model's own module list, so every name it produces resolves with
``component.get_submodule(path)``. The model-free helpers below convert names when reading files
(header-first, no model at hand).
"""

from __future__ import annotations

import re

from studio.models.ldm import unet_module_to_sgm

# peft inserts these levels into a wrapped model's module paths
_PEFT_PARTS = re.compile(r"(^|\.)(base_layer|lora_\w+|hada_\w+|lokr_\w+|lora_dropout|lora_magnitude_vector)(\.|$)")
UNET_PREFIX = "lora_unet_"


def te_prefix(component: str, family: str | None) -> str:
    if component == "text_encoder_2":
        return "lora_te2_"
    return "lora_te1_" if family == "sdxl" else "lora_te_"


def part_of(webui_name: str) -> str:
    """``unet`` / ``te1`` / ``te2`` for a webUI module name (``lora_te_`` counts as te1)."""
    if webui_name.startswith("lora_te2_"):
        return "te2"
    if webui_name.startswith(("lora_te_", "lora_te1_")):
        return "te1"
    return "unet"


def component_of(webui_name: str) -> str:
    return {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2"}[part_of(webui_name)]


def strip_peft(path: str) -> str:
    if path.startswith("base_model.model."):
        path = path[len("base_model.model."):]
    return path


def te_webui_path(path: str) -> str:
    """``encoder.layers.0.self_attn.q_proj`` or ``text_model.encoder...`` -> ``text_model_encoder_layers_0_...``."""
    if path.startswith("text_model."):
        path = path[len("text_model."):]
    return "text_model_" + path.replace(".", "_")


def to_webui_name(component: str, path: str, family: str | None, unet_config=None) -> str:
    """Model-free: webUI name of module ``path`` of ``component`` (raises KeyError if unmappable)."""
    path = strip_peft(path)
    if component == "unet":
        if family == "sdxl":
            path = unet_module_to_sgm(path, unet_config or sdxl_default_config())
        return UNET_PREFIX + path.replace(".", "_")
    if component in ("text_encoder", "text_encoder_2"):
        return te_prefix(component, family) + te_webui_path(path)
    raise KeyError(component)


def sdxl_default_config(up_with_attention=(True, True, False)) -> dict:
    """The part of an SDXL UNet config the SGM naming needs (real SDXL: up blocks 0, 1 have attention)."""
    return {"layers_per_block": 2,
            "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_with_attention]}


_RESNET_UNDERSCORE = ("conv1", "conv2", "time_emb_proj", "conv_shortcut", "norm1", "norm2")


def underscored_unet_to_dotted(rest: str) -> str:
    """``down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_q`` -> ``down_blocks.0.attentions.1.<rest>``.

    Only the block structure is dotted (that is all ``unet_module_to_sgm`` needs); the tail stays
    underscored, which is what the webUI name needs anyway. Used for LyCORIS / SimpleTuner names.
    """
    m = re.match(r"(down_blocks|up_blocks)_(\d+)_(attentions|resnets|downsamplers|upsamplers)_(\d+)_(.+)$", rest)
    if not m:
        m2 = re.match(r"mid_block_(attentions|resnets)_(\d+)_(.+)$", rest)
        if not m2:
            return rest
        head, tail = f"mid_block.{m2[1]}.{m2[2]}", m2[3]
        kind = m2[1]
    else:
        head, tail, kind = f"{m[1]}.{m[2]}.{m[3]}.{m[4]}", m[5], m[3]
    if kind == "resnets":
        for part in _RESNET_UNDERSCORE:
            if tail == part or tail.startswith(part + "_"):
                return f"{head}.{part}" + ("." + tail[len(part) + 1:] if tail != part else "")
    return f"{head}.{tail}"


class KeyMap:
    """Both directions between webUI names and ``(component, module_path)`` of one model."""

    def __init__(self, family: str, entries: dict[str, tuple[str, str]]):
        self.family = family
        self._to_module = entries
        self._to_webui = {v: k for k, v in entries.items()}

    def to_module(self, webui_name: str) -> tuple[str, str]:
        return self._to_module[webui_name]

    def to_webui(self, component_name: str, module_path: str) -> str:
        key = (component_name, strip_peft(module_path))
        if key not in self._to_webui and component_name.startswith("text_encoder"):
            # accept both spellings of CLIP paths, with and without the ``text_model.`` level
            alt = module_path[len("text_model."):] if module_path.startswith("text_model.") else "text_model." + module_path
            key = (component_name, strip_peft(alt))
        return self._to_webui[key]

    def __contains__(self, webui_name: str) -> bool:
        return webui_name in self._to_module

    def names(self) -> list[str]:
        return list(self._to_module)

    def __len__(self) -> int:
        return len(self._to_module)


def _components(pipe_or_components) -> dict:
    if isinstance(pipe_or_components, dict):
        return {k: v for k, v in pipe_or_components.items() if v is not None}
    out = {}
    for name in ("unet", "text_encoder", "text_encoder_2"):
        comp = getattr(pipe_or_components, name, None)
        if comp is not None:
            out[name] = comp
    return out


def _adaptable(module) -> bool:
    import torch

    if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
        return True
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, BaseTunerLayer)


def build_keymap(pipe_or_components, family: str) -> KeyMap:
    """The key map of a pipeline (or a dict of ``unet`` / ``text_encoder`` / ``text_encoder_2``).

    Covers every Linear / Conv2d module (and every peft-wrapped one) that has a webUI name.
    """
    from studio.models.family import base_family

    family = base_family(family)
    entries: dict[str, tuple[str, str]] = {}
    for comp_name, comp in _components(pipe_or_components).items():
        model = comp.get_base_model() if hasattr(comp, "get_base_model") else comp
        config = getattr(model, "config", None)
        for path, module in model.named_modules():
            if not path or _PEFT_PARTS.search(path) or not _adaptable(module):
                continue
            try:
                name = to_webui_name(comp_name, path, family, config)
            except KeyError:
                continue  # no webUI name (e.g. an SDXL module outside the SGM blocks)
            entries[name] = (comp_name, path)
    return KeyMap(family, entries)
