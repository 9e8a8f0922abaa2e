"""Safetensors read and written by our own small code: header validation, tensor-by-tensor reads, streamed writes.

The format: 8-byte little-endian header length, a JSON header (dtype, shape, byte offsets per tensor, optional
`__metadata__`), then raw bytes. `read_header` validates the header against the file size, so a truncated file fails
with one line before any tensor is read; `SafetensorsFile.get` reads each tensor with one `readinto` into its final
buffer (no mmap, so memory use is what we allocate). Pickle is never touched: `.ckpt/.pt/.pth/.bin` files or
pickle/zip magic bytes are refused with a hint to convert to safetensors (unpickling can run arbitrary code).

`StreamWriter` writes the other way round: the header is computed from a plan of (key, dtype, shape) first, then each
tensor is written at its offset as it is produced and freed, so peak memory is one tensor group, not one model. Writes
are atomic (temporary file in the same folder, fsync, rename by the caller through `commit`).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from dev2pro.errors import CheckpointError

ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}
_MAX_HEADER = 100 * 1024**2


def numel(shape) -> int:
    """Number of elements of a tensor of `shape` (1 for a scalar)."""
    n = 1
    for s in shape:
        n *= s
    return n


# ---------------------------------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def numel(self) -> int:
        return numel(self.shape)


@dataclass(frozen=True)
class Header:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    size: int


def refuse_pickle(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: {why}; dev2pro never loads pickle files (unpickling can run arbitrary code): "
                           "convert it to safetensors with a tool you trust")


def _pickle_magic(head: bytes) -> bool:
    return head[:4] == b"PK\x03\x04" or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def read_header(path) -> Header:
    """Parse and validate a safetensors header (no tensor data is read). Every failure is a one-line CheckpointError."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise refuse_pickle(path, f"'{path.suffix}' is a pickle format")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, too short for a header)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_HEADER):
            if _pickle_magic(head):
                raise refuse_pickle(path, "this is a pickle/torch.save file")
            if n <= _MAX_HEADER:
                raise CheckpointError(f"{path}: truncated safetensors file (header needs {n} bytes, file has {size})")
            raise CheckpointError(f"{path}: not a safetensors file (bad header length)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        if _pickle_magic(head):
            raise refuse_pickle(path, "this is a pickle/torch.save file") from None
        raise CheckpointError(f"{path}: not a safetensors file or corrupt header ({type(e).__name__})") from None
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + n
    tensors, end_max = {}, 0
    for key, v in header.items():
        try:
            dtype = ST_DTYPES[v["dtype"]]
            shape = tuple(int(s) for s in v["shape"])
            b, e = (int(x) for x in v["data_offsets"])
        except KeyError as e:
            raise CheckpointError(f"{path}: unsupported or corrupt header entry for '{key}' ({e})") from None
        except (TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for '{key}'") from None
        info = TensorInfo(dtype, shape, base + b, base + e)
        if e - b != info.numel * dtype.itemsize or b < 0:
            raise CheckpointError(f"{path}: corrupt header: '{key}' {list(shape)} {v['dtype']} has {e - b} bytes")
        tensors[key] = info
        end_max = max(end_max, info.end)
    if end_max > size:
        raise CheckpointError(f"{path}: truncated safetensors file (data ends at byte {end_max}, file has {size}); "
                              "download or copy it again")
    return Header(path, tensors, {str(k): str(v) for k, v in metadata.items()}, size)


class SafetensorsFile:
    """Read tensors one at a time from a validated safetensors file. Use `open_safetensors(path)`."""

    def __init__(self, path):
        self.header = read_header(path)
        self.path = self.header.path
        self._f = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self._f is not None:
            self._f.close()
            self._f = None

    def keys(self) -> list[str]:
        return list(self.header.tensors)

    @property
    def metadata(self) -> dict[str, str]:
        return self.header.metadata

    def info(self, key: str) -> TensorInfo:
        return self.header.tensors[key]

    def get(self, key: str) -> torch.Tensor:
        """The tensor `key`, read into a fresh CPU buffer (one allocation, no copy)."""
        info = self.header.tensors[key]
        buf = torch.empty(info.end - info.start, dtype=torch.uint8)
        if buf.numel():
            if self._f is None:
                self._f = open(self.path, "rb")  # noqa: SIM115 - closed in close()
            self._f.seek(info.start)
            got = self._f.readinto(memoryview(buf.numpy()))
            if got != buf.numel():
                raise CheckpointError(f"{self.path}: truncated while reading '{key}'")
        return buf.view(info.dtype).reshape(info.shape)


def open_safetensors(path) -> SafetensorsFile:
    """Open a safetensors file for tensor-by-tensor reading; any problem is a one-line CheckpointError."""
    return SafetensorsFile(path)


# ---------------------------------------------------------------------------------------------------------------------
# Writing


class StreamWriter:
    """A safetensors file written header first, then tensors at their offsets, then fsynced and renamed."""

    def __init__(self, path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None):
        self.path, self.tmp = path, path.with_name(f".{path.name}.tmp-{os.getpid()}")
        header: dict = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        self.slots, pos = {}, 0
        for key, dtype, shape in entries:
            n = numel(shape) * dtype.itemsize
            header[key] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
            self.slots[key] = (dtype, tuple(shape), pos)
            pos += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.base, self.total = 8 + len(raw), pos
        self.f = open(self.tmp, "wb")  # noqa: SIM115 - closed in finish()/abort()
        self.f.write(struct.pack("<Q", len(raw)) + raw)
        self.written: set[str] = set()

    def write(self, key: str, t: torch.Tensor) -> None:
        dtype, shape, pos = self.slots[key]
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise ValueError(f"{key}: got {t.dtype} {list(t.shape)}, header says {dtype} {list(shape)}")
        data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        self.f.seek(self.base + pos)
        self.f.write(memoryview(data))
        self.written.add(key)

    def finish(self) -> None:
        missing = set(self.slots) - self.written
        if missing:
            raise RuntimeError(f"{self.path}: tensors never written: {sorted(missing)[:3]}")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()

    def commit(self) -> None:
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if not self.f.closed:
            self.f.close()
        self.tmp.unlink(missing_ok=True)
