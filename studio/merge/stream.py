"""Reading and writing big safetensors files one tensor at a time.

``TensorReader`` reads one tensor's byte range with a plain ``seek`` + ``readinto`` (no memory map,
so resident memory does not grow with the file). ``write_streaming`` lays out the header from the
tensors' dtypes and shapes, then asks for each tensor in turn and writes it. Peak memory is about
the largest tensor (plus whatever the producer holds), never the whole checkpoint. The output goes
through ``atomic_path``.
"""

from __future__ import annotations

import json
import math
import queue
import struct
import threading
from pathlib import Path
from typing import Callable

import torch

from studio.fileio import atomic_path, read_safetensors_header

ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}


class TensorReader:
    """``reader[key]`` -> a tensor read from the file (an owned copy); use as a context manager."""

    def __init__(self, path):
        self.header = read_safetensors_header(path)
        self.path = Path(path)
        self._fh = None

    def __enter__(self):
        self._fh = open(self.path, "rb")
        return self

    def __exit__(self, *exc):
        self._fh.close()

    def keys(self):
        return self.header.tensors.keys()

    def info(self, key) -> tuple[str, tuple]:
        t = self.header.tensors[key]
        return t["dtype"], tuple(t["shape"])

    def __getitem__(self, key) -> torch.Tensor:
        info = self.header.tensors[key]
        start, end = info["data_offsets"]
        dtype = ST_DTYPES[info["dtype"]]
        buf = bytearray(end - start)
        self._fh.seek(self.header.data_start + start)
        self._fh.readinto(buf)
        if not buf:
            return torch.empty(tuple(info["shape"]), dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(tuple(info["shape"]))



def trim_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it after many mixed-size tensor frees)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _nbytes(dtype: str, shape) -> int:
    return math.prod(shape) * torch.empty((), dtype=ST_DTYPES[dtype]).element_size()


def write_streaming(path, entries: list[tuple[str, str, tuple]], produce: Callable[[str], torch.Tensor],
                    metadata: dict[str, str], progress: Callable | None = None) -> Path:
    """Write a safetensors file whose tensors ``(key, st_dtype, shape)`` come from ``produce(key)``, in order."""
    meta = {k: str(v) for k, v in metadata.items()}
    header: dict = {"__metadata__": meta}
    offset = 0
    for key, dtype, shape in entries:
        n = _nbytes(dtype, shape)
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)))
            fh.write(raw)
            # writing releases the GIL: a thread writes while the next tensor is made
            q: queue.Queue = queue.Queue(maxsize=2)
            failed: list[BaseException] = []

            def drain():
                while (item := q.get()) is not None:
                    try:
                        if not failed:
                            fh.write(item[1])
                    except BaseException as err:  # noqa: BLE001 - re-raised in the caller
                        failed.append(err)

            worker = threading.Thread(target=drain, daemon=True)
            worker.start()
            try:
                for i, (key, dtype, shape) in enumerate(entries):
                    if failed:
                        break
                    t = produce(key)
                    if TORCH_TO_ST.get(t.dtype) != dtype or tuple(t.shape) != tuple(shape):
                        raise ValueError(f"{key}: produced {t.dtype} {tuple(t.shape)}, declared {dtype} {shape}")
                    t = t.contiguous()
                    q.put((t, t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b""))
                    if progress:
                        progress((i + 1) / len(entries), key)
            finally:
                q.put(None)
                worker.join()
            if failed:
                raise failed[0]
    return Path(path)
