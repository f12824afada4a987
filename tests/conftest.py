"""Shared fixtures. Tests never reach the network: the hub is forced offline and any socket
connection to a non-loopback address fails the test. Tiny models are built once per session."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_real_connect = socket.socket.connect


def _guarded_connect(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and host not in ("localhost",) and not host.startswith(("127.", "::1", "0.0.0.0")) \
            and self.family in (socket.AF_INET, socket.AF_INET6):
        raise OSError(f"test tried to reach the network: {address!r}")
    return _real_connect(self, address)


socket.socket.connect = _guarded_connect


@pytest.fixture(autouse=True)
def _isolated_places(tmp_path_factory, tmp_path, monkeypatch):
    """Caches and the workspace live in per-session temp folders (they hold the tiny models), settings
    in a per-test one, so no test sees another's saved folders; never the user's own."""
    base = tmp_path_factory.getbasetemp()
    monkeypatch.setenv("STUDIO_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("STUDIO_CACHE_DIR", str(base / "cache"))
    monkeypatch.setenv("STUDIO_WORKSPACE", str(base / "workspace"))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


def _tiny(tiny_dir: Path, family: str, single: bool) -> Path:
    from studio.tiny import save_tiny_model

    out = tiny_dir / (f"{family}.safetensors" if single else family)
    if not out.exists():
        save_tiny_model(out, family, single_file=single)
    return out


@pytest.fixture(scope="session")
def tiny_sd1(tiny_dir) -> Path:
    """A tiny SD1.x diffusers folder."""
    return _tiny(tiny_dir, "sd1", False)


@pytest.fixture(scope="session")
def tiny_sdxl(tiny_dir) -> Path:
    """A tiny SDXL diffusers folder (te1 32 wide, te2 64 wide)."""
    return _tiny(tiny_dir, "sdxl", False)


@pytest.fixture(scope="session")
def tiny_sd1_file(tiny_dir) -> Path:
    """The tiny SD1.x as one single-file webUI checkpoint (fp32, configs embedded)."""
    return _tiny(tiny_dir, "sd1", True)


@pytest.fixture(scope="session")
def tiny_sdxl_file(tiny_dir) -> Path:
    return _tiny(tiny_dir, "sdxl", True)


@pytest.fixture(scope="session")
def sd1_pipe(tiny_sd1):
    """The tiny SD1.x pipeline loaded through the studio's loader (CPU, fp32). Shared: do not mutate."""
    import torch

    from studio.models.loader import load_pipeline

    return load_pipeline(str(tiny_sd1), "cpu", torch.float32).pipe


@pytest.fixture(scope="session")
def sdxl_pipe(tiny_sdxl):
    import torch

    from studio.models.loader import load_pipeline

    return load_pipeline(str(tiny_sdxl), "cpu", torch.float32).pipe
