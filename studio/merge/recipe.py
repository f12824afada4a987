"""The metadata a merged file carries: where it came from and how it was made.

- ``modelspec.merged_from``: the inputs' titles, comma separated (SAI ModelSpec);
- ``studio.merge_recipe``: JSON (A1111 parses a value starting with ``{`` as JSON and shows it):
  ``{"method", "rank", "energy", "blocks", "inputs": [{"name", "sshs_model_hash", "weight", "blocks"}],
  "base" (bake), "studio_version"}``; the Inspect tab shows it;
- ``sshs_model_hash`` / ``sshs_legacy_hash`` of the *result* are recomputed by the writers.

Input hashes are computed from the files' bytes (``sshs_hashes``), not copied from their metadata,
which is often stale after an edit.
"""

from __future__ import annotations

import json
from pathlib import Path

RECIPE_KEY = "studio.merge_recipe"


def input_entry(path, weight: float | None = None, blocks: dict | None = None, metadata: dict | None = None) -> dict:
    from studio.fileio import sshs_hashes

    p = Path(path)
    model_hash, legacy = sshs_hashes(p)
    entry = {"name": p.name, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy}
    title = (metadata or {}).get("modelspec.title") or (metadata or {}).get("ss_output_name")
    if title:
        entry["title"] = title
    if weight is not None:
        entry["weight"] = weight
    if blocks:
        entry["blocks"] = blocks
    return entry


def title_of(entry: dict) -> str:
    return entry.get("title") or Path(entry["name"]).stem


def build_recipe(method: str, entries: list[dict], **extra) -> dict:
    from studio import __version__ as version

    recipe = {"method": method, "inputs": entries}
    recipe.update({k: v for k, v in extra.items() if v is not None})
    recipe["studio_version"] = version
    return recipe


def recipe_metadata(recipe: dict) -> dict[str, str]:
    """The metadata keys for a recipe: the JSON itself and ``modelspec.merged_from``."""
    names = [title_of(e) for e in recipe.get("inputs", [])]
    if recipe.get("base"):
        names = [title_of(recipe["base"])] + names
    return {RECIPE_KEY: json.dumps(recipe, sort_keys=True), "modelspec.merged_from": ", ".join(names)}


def read_recipe(metadata: dict[str, str]) -> dict | None:
    """The recipe stored in a file's metadata, or None (for Inspect)."""
    raw = metadata.get(RECIPE_KEY)
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def describe_recipe(recipe: dict) -> str:
    """One readable line per input: ``0.70 x A.safetensors (a1b2c3d4e5f6)``."""
    head = f"method {recipe.get('method')}"
    if recipe.get("rank"):
        head += f", rank {recipe['rank']}"
    if recipe.get("energy"):
        head += f", energy {recipe['energy']}"
    lines = [head]
    if recipe.get("base"):
        b = recipe["base"]
        lines.append(f"base {b.get('name')} ({(b.get('sshs_model_hash') or b.get('sshs_legacy_hash') or '')[:12]})")
    for e in recipe.get("inputs", []):
        w = e.get("weight")
        lines.append(f"{w:+.3f} x {e.get('name')} ({e.get('sshs_model_hash', '')[:12]})" if w is not None
                     else f"{e.get('name')} ({e.get('sshs_model_hash', '')[:12]})")
    return "\n".join(lines)
