"""Files: atomic writes, a defensive safetensors header reader, and the hashes webUIs show.

Every file the studio writes goes through ``atomic_write``: the bytes land in a temporary file
in the same folder, are flushed to disk, then renamed over the target. A crash, a kill or a full
disk leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from studio.errors import StudioError

# safetensors' own reader refuses headers above 100 MB; we do the same before reading them.
MAX_HEADER_BYTES = 100_000_000
_DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    On any exception the temporary file is removed and ``path`` is left as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], Any]) -> Path:
    """Call ``writer(tmp_path)`` and atomically move the result to ``path``."""
    try:
        with atomic_path(path) as tmp:
            writer(tmp)
    except OSError as err:
        raise StudioError(
            f"Could not write {path}: {err.strerror or err}",
            "Check that the disk has free space and the folder is writable.",
        ) from err
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """Write torch tensors as .safetensors atomically (contiguous copies, string metadata)."""
    from safetensors.torch import save_file

    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    return atomic_write(path, lambda tmp: save_file(clean, str(tmp), metadata=meta))


@dataclass
class SafetensorsHeader:
    """What a .safetensors file says about itself, read without loading any tensor."""

    path: Path
    header_len: int
    tensors: dict[str, dict] = field(default_factory=dict)  # name -> {"dtype", "shape", "data_offsets"}
    metadata: dict[str, str] = field(default_factory=dict)
    file_size: int = 0

    @property
    def data_start(self) -> int:
        return 8 + self.header_len

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key]["shape"])

    def dtypes(self) -> set[str]:
        return {t["dtype"] for t in self.tensors.values()}


def read_safetensors_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse and validate a safetensors header, reading only the header bytes.

    Raises StudioError with a plain reason for anything that is not a sound safetensors file:
    too short, a header length past the end of the file, a huge header, bad JSON, tensor data
    outside the file. Never loads tensors, never hangs on a large file.
    """
    p = Path(path)
    if not p.is_file():
        raise StudioError(f"{p} does not exist or is not a file.", "Check the path.")
    size = p.stat().st_size
    with open(p, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise StudioError(f"{p.name} is not a safetensors file: it is only {size} bytes long.",
                              "The file is empty or truncated; download or export it again.")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
                raise StudioError(f"{p.name} is a pickle (a .ckpt/.pt file renamed to .safetensors), not safetensors.",
                                  "Rename it to .ckpt, or better, get the .safetensors version of the file.")
        if n > MAX_HEADER_BYTES:
            raise StudioError(f"{p.name} is not a valid safetensors file: its header claims {n} bytes.",
                              "The file is corrupt or not a safetensors file.")
        if 8 + n > size:
            raise StudioError(f"{p.name} is truncated: its header needs {n} bytes but the file has {size - 8}.",
                              "The download or copy did not finish; fetch the file again.")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
    except (UnicodeDecodeError, ValueError) as err:
        raise StudioError(f"{p.name} is not a valid safetensors file: the header is not JSON ({err}).",
                          "The file is corrupt or not a safetensors file.") from err
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        meta = {}
    data_len = size - 8 - n
    for name, info in header.items():
        try:
            start, end = info["data_offsets"]
            shape = info["shape"]
            dtype = info["dtype"]
        except (TypeError, KeyError, ValueError) as err:
            raise StudioError(f"{p.name}: tensor {name!r} has a malformed header entry.",
                              "The file is corrupt; export it again.") from err
        if end > data_len or start > end:
            raise StudioError(f"{p.name} is truncated: tensor {name!r} ends at byte {end} of data "
                              f"but the file holds {data_len}.",
                              "The download or copy did not finish; fetch the file again.")
        count = 1
        for d in shape:
            count *= int(d)
        if dtype in _DTYPE_SIZES and count * _DTYPE_SIZES[dtype] != end - start:
            raise StudioError(f"{p.name}: tensor {name!r} has {end - start} bytes for shape {shape} {dtype}.",
                              "The file is corrupt; export it again.")
    return SafetensorsHeader(path=p, header_len=n, tensors=header,
                             metadata={str(k): str(v) for k, v in meta.items()}, file_size=size)


def sshs_hashes(path: str | os.PathLike, chunk: int = 1 << 20) -> tuple[str, str]:
    """(``sshs_model_hash``, ``sshs_legacy_hash``) as A1111 / kohya compute them.

    The model hash is sha256 over the bytes after the header, so it does not change when only
    metadata changes; the legacy hash is the first 8 hex of sha256 over 64 KiB at offset 1 MiB.
    """
    p = Path(path)
    with open(p, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        fh.seek(8 + n)
        h = hashlib.sha256()
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest(), legacy_hash(p)


def legacy_hash(path: str | os.PathLike) -> str:
    """``sshs_legacy_hash``, A1111's old short model hash: sha256 of 64 KiB at offset 1 MiB, 8 hex."""
    with open(path, "rb") as fh:
        fh.seek(0x100000)
        return hashlib.sha256(fh.read(0x10000)).hexdigest()[:8]


def tensors_hash(tensors: dict) -> str:
    """sshs_model_hash of the tensors a file would hold, computed before writing it.

    safetensors lays tensors out sorted by (dtype alignment, name); rather than re-deriving that
    layout, serialise without metadata and hash the data section: identical to the written file's.
    """
    from safetensors.torch import save

    blob = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    (n,) = struct.unpack("<Q", blob[:8])
    return hashlib.sha256(blob[8 + n:]).hexdigest()


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def torch_load_safe(path: str | os.PathLike) -> Any:
    """Load a .ckpt / .pt / .bin pickle with ``weights_only=True``; refuse anything else.

    A pickle can run arbitrary code when unpickled. ``weights_only`` only rebuilds tensors and
    plain containers; a file that needs more is refused with a message rather than trusted.
    """
    import pickle

    import torch

    p = Path(path)
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise StudioError(
            f"{p.name} was refused: it is a pickle that asks to run code or build objects other than "
            f"tensors ({str(err).splitlines()[0][:200]}).",
            "Only load pickles from people you trust, and prefer the .safetensors version of the file.",
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise StudioError(f"{p.name} could not be read as a PyTorch file: {str(err).splitlines()[0][:200]}",
                          "The file is corrupt or truncated; fetch it again.") from err
