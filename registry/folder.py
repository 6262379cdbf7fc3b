"""Reading a Hugging Face style model folder: which files, which kind, what metadata, what is unsafe."""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BadInput
from .models import KINDS

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".gguf", ".h5", ".msgpack", ".onnx")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SKIP_DIRS = {".git", ".cache", "__pycache__"}
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit
DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "F4": 1, "F6_E2M3": 1,
               "F6_E3M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
               "I64": 8, "U64": 8, "F64": 8, "C64": 8}


@dataclass
class FolderScan:
    """A validated folder: its files (relative path -> absolute path), kind and metadata."""

    root: Path
    files: dict[str, Path]
    kind: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def total_size(self) -> int:
        return sum(p.stat().st_size for p in self.files.values())

    @property
    def unsafe_files(self) -> list[str]:
        return self.meta.get("unsafe_files", [])


def check_relative_path(rel: str) -> str:
    """Refuse absolute paths, backslashes and `..` components in a file's path."""
    parts = rel.split("/")
    if rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts):
        raise BadInput(f"refusing file name {rel!r}: paths must be relative, without '..', '.' or backslashes")
    return rel


def scan_folder(folder: Path, kind: str | None = None, contain_within: Path | None = None) -> FolderScan:
    """Validate a model folder and read its kind and metadata; raise BadInput on anything wrong."""
    folder = Path(folder)
    if not folder.exists():
        raise BadInput(f"folder {folder} does not exist; pass the path of a model folder")
    if not folder.is_dir():
        raise BadInput(f"{folder} is not a folder; pass the path of a model folder")
    if kind is not None and kind not in KINDS:
        raise BadInput(f"unknown kind {kind!r}; use one of: {', '.join(KINDS)}")
    files = _walk(folder, (contain_within or folder).resolve())
    if not files:
        raise BadInput(f"folder {folder} is empty; pass a folder with model files")
    if not any(rel.endswith(WEIGHT_SUFFIXES) for rel in files):
        raise BadInput(f"folder {folder} has no model files ({', '.join(WEIGHT_SUFFIXES[:5])}, ...); "
                       "pass a folder saved with save_pretrained")
    meta = read_metadata(files)
    return FolderScan(folder, files, kind or detect_kind(files, meta), meta)


def _walk(folder: Path, boundary: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in list(dirnames):
            full = Path(dirpath) / name
            if full.is_symlink():  # os.walk does not descend into linked folders: treat them as entries
                dirnames.remove(name)
                _check_inside(full, boundary, folder)
                filenames.append(name)
        for name in filenames:
            full = Path(dirpath) / name
            rel = check_relative_path(full.relative_to(folder).as_posix())
            if full.is_symlink():
                _check_inside(full, boundary, folder)
            if full.is_dir():
                raise BadInput(f"{rel} is a link to a folder; copy the folder in instead")
            if not full.is_file():
                raise BadInput(f"{rel} is not a regular file; remove it from {folder}")
            files[rel] = full
    return dict(sorted(files.items()))


def _check_inside(link: Path, boundary: Path, folder: Path) -> None:
    target = link.resolve()
    if not target.is_relative_to(boundary):
        raise BadInput(f"{link.relative_to(folder)} is a symlink to {target}, outside {boundary}; "
                       "copy the file into the folder instead")


def detect_kind(files: dict[str, Path], meta: dict[str, Any]) -> str:
    """adapter_config.json -> adapter; a quantization config -> quantized; otherwise base."""
    if "adapter_config.json" in files:
        return "adapter"
    if "quantization_config" in meta:
        return "quantized"
    return "base"


def read_metadata(files: dict[str, Path]) -> dict[str, Any]:
    """model_type, architectures, dtype, parameter count, peft and quantization configs, unsafe files."""
    meta: dict[str, Any] = {}
    config = _read_json(files, "config.json")
    if config:
        for key in ("model_type", "architectures"):
            if key in config:
                meta[key] = config[key]
        dtype = config.get("dtype") or config.get("torch_dtype")
        if dtype:
            meta["dtype"] = str(dtype)
        if "quantization_config" in config:
            meta["quantization_config"] = config["quantization_config"]
    quant = _read_json(files, "quantize_config.json") or _read_json(files, "quantization_config.json")
    if quant and "quantization_config" not in meta:
        meta["quantization_config"] = quant
    adapter = _read_json(files, "adapter_config.json")
    if adapter:
        meta["peft_config"] = adapter
    params = 0
    for rel, path in files.items():
        if rel.endswith(".safetensors"):
            params += read_safetensors_header(path, rel)[1]
    if params:
        meta["parameter_count"] = params
    unsafe = [rel for rel in files if rel.endswith(PICKLE_SUFFIXES)]
    if unsafe:
        meta["unsafe_files"] = unsafe
    return meta


def _read_json(files: dict[str, Path], rel: str) -> dict[str, Any] | None:
    if rel not in files:
        return None
    try:
        data = json.loads(files[rel].read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadInput(f"{rel} is not valid JSON ({exc}); fix or remove it") from None
    return data if isinstance(data, dict) else None


def read_safetensors_header(path: Path, rel: str | None = None) -> tuple[dict[str, Any], int]:
    """Parse and check a safetensors header; returns (header, parameter count) or raises BadInput."""
    rel = rel or path.name
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise BadInput(f"{rel}: invalid safetensors file (shorter than its 8-byte header length)")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_SAFETENSORS_HEADER or length > size - 8:
            raise BadInput(f"{rel}: invalid safetensors header (length {length} for a {size}-byte file)")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadInput(f"{rel}: invalid safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise BadInput(f"{rel}: invalid safetensors header (not a JSON object)")
    data_len = size - 8 - length
    params = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        params += _check_tensor(rel, name, info, data_len)
    return header, params


def _check_tensor(rel: str, name: str, info: Any, data_len: int) -> int:
    try:
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        numel = math.prod(int(d) for d in shape)
        itemsize = DTYPE_SIZES[dtype]
    except (KeyError, TypeError, ValueError):
        raise BadInput(f"{rel}: invalid safetensors header (bad entry for tensor {name!r})") from None
    if not (0 <= begin <= end <= data_len):
        raise BadInput(f"{rel}: invalid safetensors header (tensor {name!r} offsets {begin}..{end} "
                       f"past the end of {data_len} data bytes)")
    if dtype not in ("F4", "F6_E2M3", "F6_E3M2") and end - begin != numel * itemsize:
        raise BadInput(f"{rel}: invalid safetensors header (tensor {name!r} has {end - begin} bytes "
                       f"for shape {shape} of {dtype})")
    return numel
