"""Where things live: settings and caches (platformdirs) and the workspace (datasets, runs, outputs).

Environment variables override the defaults, which tests and portable installs use:
``STUDIO_CONFIG_DIR`` (settings), ``STUDIO_CACHE_DIR`` (caches), ``STUDIO_WORKSPACE`` (workspace).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from studio.errors import StudioError
from studio.fileio import atomic_write_json

APP_NAME = "AdapterStudio"
WORKSPACE_DIRS = ("datasets", "runs", "outputs/loras", "outputs/embeddings", "outputs/checkpoints",
                  "outputs/images", "models")


def config_dir() -> Path:
    env = os.environ.get("STUDIO_CONFIG_DIR")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_config_dir(APP_NAME, appauthor=False))


def cache_dir() -> Path:
    env = os.environ.get("STUDIO_CACHE_DIR")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False))


def default_workspace() -> Path:
    env = os.environ.get("STUDIO_WORKSPACE")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False)) / "workspace"


@dataclass
class Settings:
    """The small set of choices that persist between sessions (``settings.json``)."""

    workspace: str = ""
    models_dirs: list[str] = field(default_factory=list)  # webUI checkpoint folders
    lora_dirs: list[str] = field(default_factory=list)  # webUI LoRA folders
    data_dirs: list[str] = field(default_factory=list)  # other folders the browser may open (e.g. photos)
    last_model: str = ""
    precision: str = "auto"  # auto | fp16 | bf16 | fp32
    device: str = "auto"  # auto | cuda | cpu | mps

    @classmethod
    def path(cls) -> Path:
        return config_dir() / "settings.json"

    @classmethod
    def load(cls) -> "Settings":
        p = cls.path()
        if not p.exists():
            return cls()
        try:
            raw = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            # A damaged settings file must never stop the studio from starting: keep it for the
            # user to look at, and start from defaults.
            p.replace(p.with_suffix(".json.broken"))
            return cls()
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    def save(self) -> Path:
        return atomic_write_json(self.path(), asdict(self))

    def workspace_path(self) -> Path:
        return Path(self.workspace).expanduser() if self.workspace else default_workspace()


class Workspace:
    """The folder that holds the user's datasets, runs and outputs."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()

    def ensure(self) -> "Workspace":
        try:
            for sub in WORKSPACE_DIRS:
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StudioError(f"Cannot create the workspace at {self.root}: {err.strerror or err}",
                              "Choose another folder with --workspace or in Settings.") from err
        return self

    datasets = property(lambda self: self.root / "datasets")
    runs = property(lambda self: self.root / "runs")
    loras = property(lambda self: self.root / "outputs" / "loras")
    embeddings = property(lambda self: self.root / "outputs" / "embeddings")
    checkpoints = property(lambda self: self.root / "outputs" / "checkpoints")
    images = property(lambda self: self.root / "outputs" / "images")
    models = property(lambda self: self.root / "models")  # the tiny demo model and user downloads


def hf_token_path() -> Path:
    return config_dir() / "hf_token"


def save_hf_token(token: str) -> Path | None:
    """Store a Hugging Face token readable by the owner only (mode 0600), or remove it if empty."""
    p = hf_token_path()
    token = token.strip()
    if not token:
        p.unlink(missing_ok=True)
        return None
    p.parent.mkdir(parents=True, exist_ok=True)
    from studio.fileio import atomic_path

    with atomic_path(p) as tmp:
        os.chmod(tmp, 0o600)  # before the secret is written, so it is never readable by others
        tmp.write_text(token + "\n", encoding="utf-8")
    os.chmod(p, 0o600)
    return p


def load_hf_token() -> str | None:
    p = hf_token_path()
    try:
        return p.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def apply_hf_token() -> None:
    """Make a stored token visible to huggingface_hub (for gated models) unless one is already set."""
    token = load_hf_token()
    if token and not os.environ.get("HF_TOKEN"):
        os.environ["HF_TOKEN"] = token
