"""Streaming safetensors reading and writing, one tensor (or one row range) at a time.

One job: move tensors between safetensors files and memory without ever holding a whole shard,
let alone a whole model: a read returns just the requested rows of one tensor (plain ``read``
calls, no memory map, so the resident set does not grow with the file), and a write streams each
tensor's bytes to disk. Non-goals: knowing what the tensors mean (``key_maps.py``).

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length
``N``, ``N`` bytes of JSON ``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__":
{...}}``, then the data; offsets are relative to the end of the header. Everything a truncated or
corrupt file can get wrong is checked when the header is opened, before any tensor is read.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from nemo_opdlm.checkpoint.errors import CheckpointFileError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
if hasattr(torch, "float8_e4m3fn"):
    DTYPES.update({"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2})
NAMES = {dtype: name for name, dtype in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in a file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    """Absolute byte offset of the data in the file."""
    nbytes: int


class SafetensorsFile:
    """The header of one safetensors file, validated; reads tensors or row ranges on demand."""

    def __init__(self, path: str) -> None:
        self.path = path
        if not os.path.isfile(path):
            raise CheckpointFileError(f"safetensors file {path} does not exist")
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CheckpointFileError(f"{path} is corrupt: {size} bytes, shorter than a safetensors header")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > min(size - 8, _MAX_HEADER):
                raise CheckpointFileError(
                    f"{path} is corrupt: header claims {header_len} bytes but the file has {size}"
                )
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise CheckpointFileError(f"{path} is corrupt: unreadable header ({err})") from None
        if not isinstance(header, dict):
            raise CheckpointFileError(f"{path} is corrupt: header is not a JSON object")
        self.metadata: dict = header.pop("__metadata__", None) or {}
        data_start = 8 + header_len
        self.entries: dict[str, TensorEntry] = {}
        for name, info in header.items():
            self.entries[name] = self._entry(name, info, data_start, size)

    def _entry(self, name: str, info: dict, data_start: int, size: int) -> TensorEntry:
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointFileError(f"{self.path} is corrupt: bad header entry for {name!r} ({err!r})") from None
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if end - begin != nbytes or begin < 0:
            raise CheckpointFileError(
                f"{self.path} is corrupt: {name!r} spans {end - begin} bytes, its shape {shape} needs {nbytes}"
            )
        if data_start + end > size:
            raise CheckpointFileError(
                f"{self.path} is truncated: {name!r} ends at byte {data_start + end}, the file has {size}"
            )
        return TensorEntry(dtype=dtype, shape=shape, begin=data_start + begin, nbytes=nbytes)

    def read(self, name: str, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Tensor ``name`` (or rows ``[start, stop)`` of its first axis), freshly allocated."""
        entry = self.entries[name]
        shape, begin, nbytes = list(entry.shape), entry.begin, entry.nbytes
        if rows is not None:
            start, stop = rows
            if not (0 <= start <= stop <= shape[0]):
                raise ValueError(f"rows {rows} out of range for {name!r} with shape {tuple(shape)}")
            row_bytes = nbytes // shape[0] if shape[0] else 0
            begin, nbytes, shape[0] = begin + start * row_bytes, (stop - start) * row_bytes, stop - start
        buf = torch.empty(nbytes, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(begin)
            got = f.readinto(memoryview(buf.numpy()))
        if got != nbytes:
            raise CheckpointFileError(f"{self.path}: short read of {name!r} ({got} of {nbytes} bytes)")
        return buf.view(entry.dtype).reshape(shape)


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().contiguous().cpu().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def write_safetensors(path: str, tensors: Iterable[tuple[str, torch.Tensor]], metadata: Optional[dict] = None) -> int:
    """Write ``(name, tensor)`` pairs to ``path`` streaming each tensor's bytes; returns data bytes.

    The tensors are held by the caller; this function copies none of them (a non-contiguous
    tensor is made contiguous one at a time).
    """
    items = list(tensors)
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, t in items:
        if t.dtype not in NAMES:
            raise ValueError(f"cannot write {name!r}: dtype {t.dtype} has no safetensors name")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, t in items:
            f.write(_tensor_bytes(t))
    return offset
