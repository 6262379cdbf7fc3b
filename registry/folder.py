"""Reading a Hugging Face style model folder: which files, which kind, what metadata, what is unsafe."""
from __future__ import annotations

import errno
import fnmatch
import json
import os
import struct
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BadInput, OperationFailed, RegistryError
from .gguf.inspect import describe_gguf_files
from .models import KINDS

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".gguf", ".h5", ".msgpack", ".onnx")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SKIP_DIRS = {".git", ".cache", "__pycache__"}
MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors loader's own limit (HeaderTooLarge)
# Bits per element of every dtype the safetensors loader knows (its `Dtype` enum); any other name is refused.
DTYPE_BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
              "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
              "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64}


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
    """Refuse absolute paths, backslashes, `..` components and control characters in a file's path.

    A newline or other control character would break `show`, `manifest --format sha256sum` and terminals.
    """
    parts = rel.split("/")
    if rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts):
        raise BadInput(f"refusing file name {rel!r}: paths must be relative, without '..', '.' or backslashes")
    bad = next((c for c in rel if unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp")), None)
    if bad is not None:  # Cs: a byte that is not UTF-8, which os.listdir hands back as a lone surrogate
        what = "a byte that is not UTF-8" if unicodedata.category(bad) == "Cs" else "a control character"
        raise BadInput(f"refusing file name {rel!r}: it contains {what} (U+{ord(bad):04X}); rename the file")
    return rel


def excluded(rel: str, is_dir: bool, patterns: tuple[str, ...] | list[str]) -> bool:
    """Whether `exclude` globs (fnmatch on the path relative to the folder) leave this file or folder out; a
    pattern ending in "/" matches folders only, so ["*/"] keeps the top-level files alone."""
    return any(fnmatch.fnmatchcase(rel + "/" if is_dir else rel, p) or (is_dir and fnmatch.fnmatchcase(rel, p))
               for p in patterns)


def scan_folder(folder: Path, kind: str | None = None, contain_within: Path | None = None,
                exclude: tuple[str, ...] | list[str] = ()) -> FolderScan:
    """Validate a model folder and read its kind and metadata; raise BadInput on anything wrong. Files and
    folders matching `exclude` (see `excluded`) are neither read nor registered."""
    folder = Path(folder)
    if not folder.exists():
        raise BadInput(f"folder {folder} does not exist; pass the path of a model folder")
    if not folder.is_dir():
        raise BadInput(f"{folder} is not a folder; pass the path of a model folder")
    if kind is not None and kind not in KINDS:
        raise BadInput(f"unknown kind {kind!r}; use one of: {', '.join(KINDS)}")
    try:
        files = _walk(folder, (contain_within or folder).resolve(), tuple(exclude))
        if not files:
            raise BadInput(f"folder {folder} is empty; pass a folder with model files")
        if not any(rel.endswith(WEIGHT_SUFFIXES) for rel in files):
            raise BadInput(f"folder {folder} has no model files ({', '.join(WEIGHT_SUFFIXES[:5])}, ...); "
                           "pass a folder saved with save_pretrained")
        meta = read_metadata(files)
    except OSError as exc:  # an unreadable input is the user's to fix; a retry would fail the same way
        raise _unreadable(exc, folder) from None
    return FolderScan(folder, files, checked_kind(kind, files, meta, str(folder)), meta)


# OSErrors that say something about the input (permissions, links, names), not about this machine.
INPUT_ERRNOS = {errno.EACCES, errno.EPERM, errno.ELOOP, errno.ENOENT, errno.ENOTDIR, errno.EISDIR,
                errno.ENAMETOOLONG}


def _unreadable(exc: OSError, folder: Path) -> RegistryError:
    where = Path(exc.filename) if exc.filename else folder
    shown = where.relative_to(folder).as_posix() if where.is_relative_to(folder) and where != folder else where
    message = f"cannot read {shown!s} in {folder}: {exc.strerror or exc}"
    if exc.errno in (errno.EACCES, errno.EPERM):
        message += "; make it readable by the user that runs the import (the worker's user for a queued job)"
    elif exc.errno == errno.ENOENT:
        message += "; the folder changed while it was read: import it again once it is complete"
    return BadInput(message) if exc.errno in INPUT_ERRNOS else OperationFailed(message)


def _raise(exc: OSError) -> None:
    raise exc  # os.walk skips folders it cannot list unless told otherwise: a partial import is worse


def _walk(folder: Path, boundary: Path, exclude: tuple[str, ...] = ()) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(folder, onerror=_raise, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        if exclude:
            base = Path(dirpath).relative_to(folder).as_posix()
            rel_of = (lambda n: n) if base == "." else (lambda n: f"{base}/{n}")  # noqa: E731
            dirnames[:] = [d for d in dirnames if not excluded(rel_of(d), True, exclude)]
            filenames = [n for n in filenames if not excluded(rel_of(n), (Path(dirpath) / n).is_dir(), exclude)]
        for name in list(dirnames):
            full = Path(dirpath) / name
            if full.is_symlink():  # os.walk does not descend into linked folders: treat them as entries
                dirnames.remove(name)
                filenames.append(name)
            else:
                check_relative_path(full.relative_to(folder).as_posix())
        for name in filenames:
            full = Path(dirpath) / name
            rel = check_relative_path(full.relative_to(folder).as_posix())
            if full.is_symlink():
                _check_inside(full, rel, boundary, folder)
            if full.is_dir():
                raise BadInput(f"{rel} is a link to a folder; copy the folder in instead")
            if not full.is_file():
                raise BadInput(f"{rel} is not a regular file; remove it from {folder}")
            with open(full, "rb"):  # unreadable files fail here, before any byte is stored
                pass
            files[rel] = full
    return dict(sorted(files.items()))


def _check_inside(link: Path, rel: str, boundary: Path, folder: Path) -> None:
    try:
        target = Path(os.path.realpath(link, strict=True))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BadInput(f"{rel} is a symlink loop; remove it from {folder}") from None
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            raise BadInput(f"{rel} is a broken symlink (to {os.readlink(link)!r}); remove it from {folder} "
                           "or copy the file in") from None
        raise
    if not target.is_relative_to(boundary):
        raise BadInput(f"{rel} is a symlink to {str(target)!r}, outside {boundary}; "
                       "copy the file into the folder instead")


def detect_kind(files: dict[str, Path], meta: dict[str, Any]) -> str:
    """Weights that are all .gguf files -> gguf (llama.cpp's format, whatever configs lie beside them: generate and
    export --ollama take it); adapter_config.json -> adapter; a quantization config -> quantized; otherwise base."""
    if "gguf" in meta:  # read_metadata read them
        return "gguf"
    if "adapter_config.json" in files:
        return "adapter"
    if "quantization_config" in meta:
        return "quantized"
    return "base"


def checked_kind(kind: str | None, files: dict[str, Path], meta: dict[str, Any], what: str) -> str:
    """The kind asked for (--kind), or the one detected; GGUF weights are no transformers model, whatever asked."""
    if kind not in (None, "gguf", "checkpoint") and "gguf" in meta:
        raise BadInput(f"{what} holds GGUF weights only, which are kind gguf, not {kind}; leave out --kind {kind}")
    return kind or detect_kind(files, meta)


def gguf_only(files: dict[str, Path]) -> bool:
    """Whether the folder's weights are all .gguf files (a GGUF beside safetensors is just a file of the model)."""
    weights = [rel for rel in files if rel.endswith(WEIGHT_SUFFIXES)]
    return bool(weights) and all(rel.endswith(".gguf") for rel in weights)


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
    if gguf_only(files):  # their headers read, and checked whole, as the safetensors headers above
        meta["gguf"] = describe_gguf_files(files)
        params = meta["gguf"].get("parameter_count") or 0
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
    """Parse and check a safetensors header by the safetensors loader's own rules.

    Returns (header, parameter count) or raises BadInput naming the file and the broken rule. The rules mirror
    safetensors 0.8 (`Metadata::validate`): the header is UTF-8 JSON of at most 100,000,000 bytes; each tensor
    has a known dtype, a shape and two data_offsets of non-negative integers; `__metadata__` maps strings to
    strings; sorted by offset, the tensors fill the data section exactly, without gaps or overlaps; each
    tensor's byte range matches its shape and dtype.
    """
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
    header = _parse_header_json(rel, raw)
    tensors = []
    for name, info in header.items():
        if name == "__metadata__":
            _check_metadata(rel, info)
        else:
            tensors.append((name, *_check_entry(rel, name, info)))
    data_len = size - 8 - length
    return header, _check_layout(rel, tensors, data_len)


def _bad_header(rel: str, why: str) -> BadInput:
    return BadInput(f"{rel}: invalid safetensors header ({why}); the safetensors loader refuses it: "
                    "re-save the file with safetensors")


def _parse_header_json(rel: str, raw: bytes) -> dict[str, Any]:
    def refuse_constant(name: str) -> None:  # NaN and Infinity are Python extensions, not JSON
        raise ValueError(f"{name} is not JSON")

    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=refuse_constant)
    except UnicodeDecodeError:
        raise _bad_header(rel, "not UTF-8") from None
    except (ValueError, RecursionError):
        raise _bad_header(rel, "not valid JSON") from None
    if not isinstance(header, dict):
        raise _bad_header(rel, "not a JSON object")
    return header


def _check_metadata(rel: str, meta: Any) -> None:
    if meta is None:
        return
    if not isinstance(meta, dict):
        raise _bad_header(rel, f"__metadata__ is {type(meta).__name__}, not an object of strings")
    for key, value in meta.items():
        if not isinstance(value, str):
            raise _bad_header(rel, f"__metadata__ value of {key!r} is {json.dumps(value)[:40]}, not a string")


def _is_u64(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2 ** 64


def _check_entry(rel: str, name: str, info: Any) -> tuple[str, list[int], int, int]:
    """(dtype, shape, begin, end) of one tensor entry, each of the loader's type."""
    if not isinstance(info, dict):
        raise _bad_header(rel, f"tensor {name!r} is {json.dumps(info)[:40]}, not an object")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
    if missing:
        raise _bad_header(rel, f"tensor {name!r} has no {missing[0]}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise _bad_header(rel, f"tensor {name!r} has unknown dtype {json.dumps(dtype)[:40]}")
    if not isinstance(shape, list) or not all(_is_u64(d) for d in shape):
        raise _bad_header(rel, f"tensor {name!r} has shape {json.dumps(shape)[:40]}; "
                               "a shape is a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_u64(o) for o in offsets):
        raise _bad_header(rel, f"tensor {name!r} has data_offsets {json.dumps(offsets)[:40]}; "
                               "they are two non-negative integers [begin, end]")
    return dtype, shape, offsets[0], offsets[1]


def _check_layout(rel: str, tensors: list[tuple[str, str, list[int], int, int]], data_len: int) -> int:
    """Check that the tensors tile the data section exactly; returns the parameter count."""
    position, params = 0, 0
    for name, dtype, shape, begin, end in sorted(tensors, key=lambda t: (t[3], t[4])):
        if begin != position or end < begin:
            why = "ends before it begins" if end < begin else \
                "overlaps the tensor before it" if begin < position else "leaves a gap before it"
            raise _bad_header(rel, f"tensor {name!r} offsets {begin}..{end} {why}; tensors must fill the data "
                                   "section one after another from offset 0")
        position = end
        numel = 1
        for dim in shape:  # the loader computes sizes in 64 bits and refuses what overflows
            numel *= dim
            if numel >= 2 ** 64:
                break
        bits = numel * DTYPE_BITS[dtype]
        if bits >= 2 ** 64:
            raise _bad_header(rel, f"tensor {name!r} is too large (its size overflows 64 bits)")
        if bits % 8:
            raise _bad_header(rel, f"tensor {name!r} of {dtype} shape {shape} does not end on a byte boundary")
        if end - begin != bits // 8:
            raise _bad_header(rel, f"tensor {name!r} has {end - begin} bytes for shape {shape} of {dtype}")
        params += numel
    if position > data_len:
        raise _bad_header(rel, f"tensors end at offset {position}, past the end of {data_len} data bytes")
    if position < data_len:
        raise _bad_header(rel, f"tensors cover {position} of {data_len} data bytes; the file has trailing data")
    return params
