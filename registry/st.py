"""Reading safetensors files one tensor at a time with plain reads (no mmap, so nothing stays resident)."""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch

from .errors import BadInput
from .folder import read_safetensors_header

ST_TO_TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
               "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
               "BOOL": torch.bool}


class SafetensorsFile:
    """A validated safetensors file: its raw header, tensors in file order, and reads of single tensors."""

    def __init__(self, path: Path, rel: str | None = None):
        self.path = Path(path)
        self.rel = rel or self.path.name
        read_safetensors_header(self.path, self.rel)  # length, JSON and offsets checked before we trust it
        with open(self.path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            self.header_bytes = f.read(length)
        self.header: dict[str, Any] = json.loads(self.header_bytes)
        self.data_start = 8 + length

    def tensors(self) -> list[tuple[str, dict[str, Any]]]:
        """(name, info) for every tensor, in file order."""
        items = [(k, v) for k, v in self.header.items() if k != "__metadata__"]
        return sorted(items, key=lambda kv: kv[1]["data_offsets"][0])

    def read(self, name: str) -> torch.Tensor:
        """One tensor, read into a fresh buffer (one copy, no memory map)."""
        info = self.header[name]
        begin, end = info["data_offsets"]
        dtype = ST_TO_TORCH.get(info["dtype"])
        if dtype is None:  # a valid safetensors dtype (F8, F4, unsigned ints) that this code cannot compute with
            raise BadInput(f"{self.rel}: tensor {name!r} is {info['dtype']}, which is not supported here "
                           f"(supported: {', '.join(ST_TO_TORCH)})")
        if end == begin:
            return torch.empty(info["shape"], dtype=dtype)
        buf = bytearray(end - begin)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.data_start + begin)
            if f.readinto(buf) != len(buf):
                raise OSError(f"{self.rel} is shorter than its header says")
        return torch.frombuffer(buf, dtype=dtype).reshape(info["shape"])


class TensorRef:
    """A tensor that is read only when needed: its shape is known up front."""

    def __init__(self, source: SafetensorsFile | torch.Tensor, name: str | None = None):
        self.source, self.name = source, name

    @property
    def shape(self) -> tuple[int, ...]:
        if isinstance(self.source, torch.Tensor):
            return tuple(self.source.shape)
        return tuple(self.source.header[self.name]["shape"])

    def load(self) -> torch.Tensor:
        """The tensor's values."""
        return self.source if isinstance(self.source, torch.Tensor) else self.source.read(self.name)
