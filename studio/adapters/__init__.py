"""Adapter files: every kind webUIs read (LoRA / LoCon, LoHa, LoKr, DoRA, full, embeddings).

- ``load_adapter(path)``: header-first reading of kohya, LyCORIS, diffusers, peft, A1111 files;
- ``save_adapter`` / ``export_peft``: writing the kohya layout with metadata and hashes;
- ``load_embedding`` / ``save_embedding``: textual inversion;
- ``keymap.build_keymap``: webUI names <-> model modules; ``inspect.inspect_file``: the Inspect report.
"""

from __future__ import annotations

# the kinds register themselves on import, in priority order
from studio.adapters import dora, full, loha, lokr, lora  # noqa: F401
from studio.adapters.embedding import Embedding, load_embedding, save_embedding
from studio.adapters.reader import AdapterFile, load_adapter
from studio.adapters.registry import KINDS, AdapterKind, AdapterModule
from studio.adapters.writer import export_peft, peft_to_webui, save_adapter

__all__ = ["AdapterFile", "AdapterKind", "AdapterModule", "Embedding", "KINDS", "export_peft", "load_adapter",
           "load_embedding", "peft_to_webui", "save_adapter", "save_embedding"]
