"""A GGUF file's header, read with struct alone (no numpy, torch or llama.cpp): its metadata and tensor list.

GGUF (v2 and v3; llama.cpp's ggml/docs/gguf.md): magic "GGUF", uint32 version, uint64 tensor count, uint64
metadata count; then the metadata as (string key, uint32 type, value); then per tensor (string name, uint32
n_dims, uint64 dims, uint32 GGML type, uint64 offset). Strings are a uint64 length and UTF-8 bytes. Files
written on a big-endian machine are big-endian throughout (their version reads as a huge little-endian number).
"""
from __future__ import annotations

import math
import mmap
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import BadInput

# GGUF metadata value types: id -> struct format (8 = string, 9 = array).
SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9
# Arrays longer than this (the vocabulary, its scores and merges) are skipped, not read into memory.
SMALL_ARRAY = 256
# GGML tensor types (gguf-py's GGMLQuantizationType).
GGML_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K",
              11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS",
              18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8",
              25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0",
              39: "MXFP4", 40: "NVFP4", 41: "Q1_0", 42: "Q2_0"}
# (elements per block, bytes per block) of each type: gguf-py's GGML_QUANT_SIZES (constants.py, QK_K = 256).
BLOCK_SIZES = {"F32": (1, 4), "F16": (1, 2), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24),
               "Q8_0": (32, 34), "Q8_1": (32, 36), "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144),
               "Q5_K": (256, 176), "Q6_K": (256, 210), "Q8_K": (256, 292), "IQ2_XXS": (256, 66), "IQ2_XS": (256, 74),
               "IQ3_XXS": (256, 98), "IQ1_S": (256, 50), "IQ4_NL": (32, 18), "IQ3_S": (256, 110), "IQ2_S": (256, 82),
               "IQ4_XS": (256, 136), "I8": (1, 1), "I16": (1, 2), "I32": (1, 4), "I64": (1, 8), "F64": (1, 8),
               "IQ1_M": (256, 56), "BF16": (1, 2), "TQ1_0": (256, 54), "TQ2_0": (256, 66), "MXFP4": (32, 17),
               "NVFP4": (64, 36), "Q1_0": (128, 18), "Q2_0": (64, 18)}
# llama.cpp's general.file_type (LLAMA_FTYPE_MOSTLY_*), named as --outtype and llama-quantize name them.
FILE_TYPE_NAMES = {0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 7: "q8_0", 8: "q5_0", 9: "q5_1", 10: "q2_k",
                   11: "q3_k_s", 12: "q3_k_m", 13: "q3_k_l", 14: "q4_k_s", 15: "q4_k_m", 16: "q5_k_s", 17: "q5_k_m",
                   18: "q6_k", 19: "iq2_xxs", 20: "iq2_xs", 21: "q2_k_s", 22: "iq3_xs", 23: "iq3_xxs", 24: "iq1_s",
                   25: "iq4_nl", 26: "iq3_s", 27: "iq3_m", 28: "iq2_s", 29: "iq2_m", 30: "iq4_xs", 31: "iq1_m",
                   32: "bf16", 36: "tq1_0", 37: "tq2_0", 38: "mxfp4_moe"}
# Limits a file that only claims to be GGUF runs into long before it costs time or memory; real files are far
# below them (GGML_MAX_DIMS is 4, GGML_MAX_NAME 64; the largest models have tens of thousands of tensors).
MAX_DIMS = 4
MAX_TENSORS = 1 << 20
MAX_KEYS = 1 << 16
MAX_NAME = 4096  # a key or tensor name
MAX_KEPT_STRING = 1 << 20  # longer string values (none that the registry records) are skipped, not read
MAX_NESTING = 4  # arrays of arrays
MAX_ARRAY = 1 << 24  # elements (the largest vocabularies have a few hundred thousand tokens)
DEFAULT_ALIGNMENT = 32


@dataclass
class SkippedArray:
    """A metadata array too long to keep: its element type, length and where its elements start."""

    item_type: int
    count: int
    offset: int


@dataclass
class SkippedString:
    """A metadata string too long to keep (none that the registry records is): its length and where it starts."""

    length: int
    offset: int


@dataclass
class Tensor:
    name: str
    shape: tuple[int, ...]
    type: str
    offset: int = 0  # in the data section


@dataclass
class GGUFHeader:
    version: int
    metadata: dict[str, Any]  # scalars, strings and short arrays as Python values; long ones as SkippedArray
    tensors: list[Tensor]
    data_start: int = 0  # where the tensor data starts: the header's end, aligned


def read_gguf(path: Path, shown: str | None = None) -> dict[str, Any]:
    """What the registry records about a GGUF file (artifact.meta["gguf"], without "outtype" and "file"); `shown`
    names the file in errors (default: its name). BadInput when the file is not a whole, readable GGUF."""
    path = Path(path)
    shown = shown or path.name
    with _open(path, shown) as buf:
        parser = _Parser(buf, shown)
        header = parser.header()
        _check_complete(header, len(buf), shown)
        md = header.metadata
        arch = _typed(md, "general.architecture", str)
        tokens = md.get("tokenizer.ggml.tokens")
        bos, eos = _typed(md, "tokenizer.ggml.bos_token_id", int), _typed(md, "tokenizer.ggml.eos_token_id", int)
        token_text = parser.token_texts(tokens, {i for i in (bos, eos) if i is not None})  # in the header's byte order
    vocab_size = tokens.count if isinstance(tokens, SkippedArray) else len(tokens) if isinstance(tokens, list) else None
    types: dict[str, int] = {}
    for t in header.tensors:
        types[t.type] = types.get(t.type, 0) + 1
    return {
        "architecture": arch,
        "name": _typed(md, "general.name", str),
        "file_type": _typed(md, "general.file_type", int),
        "gguf_version": header.version,
        "context_length": _typed(md, f"{arch}.context_length", int),
        "embedding_length": _typed(md, f"{arch}.embedding_length", int),
        "block_count": _typed(md, f"{arch}.block_count", int),
        "tokenizer_model": _typed(md, "tokenizer.ggml.model", str),
        "pre_tokenizer": _typed(md, "tokenizer.ggml.pre", str),
        "vocab_size": vocab_size,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "bos_token": token_text.get(bos),
        "eos_token": token_text.get(eos),
        "add_bos_token": _typed(md, "tokenizer.ggml.add_bos_token", bool),
        "chat_template": _typed(md, "tokenizer.chat_template", str),
        "tensor_count": len(header.tensors),
        "tensor_types": dict(sorted(types.items())),
        "parameter_count": sum(math.prod(t.shape) for t in header.tensors),
    }


def _typed(metadata: dict[str, Any], key: str, kind: type) -> Any:
    """metadata[key] when it has the type the registry records it as (a header may say anything), else None."""
    value = metadata.get(key)
    if kind is int:  # bool is an int in Python, and not one here
        return value if isinstance(value, int) and not isinstance(value, bool) else None
    return value if isinstance(value, kind) else None


def _check_complete(header: GGUFHeader, size: int, shown: str) -> None:
    """A download cut short keeps its header: the tensors it lists must end inside the file."""
    end = 0
    for t in header.tensors:
        block = BLOCK_SIZES.get(t.type)
        if block is not None:
            end = max(end, header.data_start + t.offset + math.prod(t.shape) // block[0] * block[1])
    if end > size:
        raise BadInput(f"{shown} is truncated: its tensors end at byte {end:,} but the file has {size:,} bytes; "
                       "download it again")


def describe_gguf_files(files: dict[str, Path]) -> dict[str, Any] | None:
    """meta["gguf"] of a folder being imported or pulled ({path in the artifact: path on disk}): one .gguf file ->
    its facts (read_gguf) with "file" and "outtype"; several (a Hub repo with every quantization) -> "files",
    {path: outtype}, and no file chosen; none -> None. BadInput names a .gguf that is not a whole GGUF file."""
    ggufs = sorted(rel for rel in files if rel.endswith(".gguf"))
    if not ggufs:
        return None
    facts = {rel: read_gguf(files[rel], rel) for rel in ggufs}
    if len(ggufs) == 1:
        [(rel, one)] = facts.items()
        return {**one, "outtype": FILE_TYPE_NAMES.get(one["file_type"]), "file": rel}
    return {"files": {rel: FILE_TYPE_NAMES.get(f["file_type"]) for rel, f in facts.items()}}


def read_header(path: Path) -> GGUFHeader:
    """All of a GGUF file's metadata (long arrays skipped) and its tensor list."""
    path = Path(path)
    with _open(path, path.name) as buf:
        return _Parser(buf, path.name).header()


LFS_POINTER = b"version https://git-lfs"


class _open:
    """The file mapped read-only (a GGUF may be many GB; only its header pages are read)."""

    def __init__(self, path: Path, shown: str):
        self.path, self.shown = path, shown

    def __enter__(self) -> mmap.mmap:
        try:
            with open(self.path, "rb") as f:
                start = f.read(len(LFS_POINTER))
                if start == LFS_POINTER:
                    raise BadInput(f"{self.shown} is a Git LFS pointer, not the file; fetch the file itself "
                                   "(git lfs pull in its clone) and import that")
                if start[:4] != b"GGUF":
                    raise BadInput(f"{self.shown} is not a GGUF file (it does not start with 'GGUF')")
                self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as exc:
            raise BadInput(f"cannot read {self.shown}: {exc.strerror or exc}") from None
        return self.map

    def __exit__(self, *exc) -> None:
        self.map.close()


class _Parser:
    def __init__(self, buf: mmap.mmap, name: str):
        self.buf, self.name, self.pos, self.order = buf, name, 4, "<"

    def header(self) -> GGUFHeader:
        with self._refusing():
            version = self._unpack("I")
            if version & 0xFFFF == 0:  # written big-endian: 3 reads as 0x03000000
                self.order = ">"
                version = struct.unpack(">I", struct.pack("<I", version))[0]
            if version not in (2, 3):
                raise BadInput(f"{self.name} is GGUF version {version}; only versions 2 and 3 are read: convert it "
                               "again with a current llama.cpp")
            n_tensors, n_kv = self._unpack("Q"), self._unpack("Q")
            if n_tensors > MAX_TENSORS or n_kv > MAX_KEYS:
                raise ValueError(f"it claims {n_tensors} tensors and {n_kv} metadata keys")
            metadata = {}
            for _ in range(n_kv):
                key = self._string(MAX_NAME)
                metadata[key] = self._value(self._unpack("I"))
            tensors = []
            for _ in range(n_tensors):
                name = self._string(MAX_NAME)
                n_dims = self._unpack("I")
                if n_dims > MAX_DIMS:
                    raise ValueError(f"tensor {name[:64]!r} has {n_dims} dimensions (at most {MAX_DIMS})")
                shape = tuple(self._unpack("Q") for _ in range(n_dims))
                if math.prod(shape) >= 1 << 62:
                    raise ValueError(f"tensor {name[:64]!r} claims {math.prod(shape)} elements")
                type_id = self._unpack("I")
                offset = self._unpack("Q")  # in the data section
                tensors.append(Tensor(name, shape, GGML_TYPES.get(type_id, f"TYPE_{type_id}"), offset))
            if sum(math.prod(t.shape) for t in tensors) >= 1 << 62:
                raise ValueError("its tensors claim more than 2^62 elements")
        alignment = metadata.get("general.alignment")
        if not (isinstance(alignment, int) and 0 < alignment <= 1 << 20):
            alignment = DEFAULT_ALIGNMENT
        return GGUFHeader(version, metadata, tensors, -(-self.pos // alignment) * alignment)

    def token_texts(self, tokens: Any, ids: set[int]) -> dict[int, str]:
        """The texts of the token ids asked for, from the (usually skipped) tokenizer.ggml.tokens array."""
        if isinstance(tokens, list):
            return {i: tokens[i] for i in ids if 0 <= i < len(tokens) and isinstance(tokens[i], str)}
        if not isinstance(tokens, SkippedArray) or tokens.item_type != STRING or not ids:
            return {}
        self.pos, found = tokens.offset, {}
        with self._refusing():
            for i in range(min(tokens.count, max(ids) + 1)):
                if i in ids:
                    found[i] = self._string()
                else:
                    self.pos += 8 + self._peek_length()
        return found

    @contextmanager
    def _refusing(self) -> Iterator[None]:
        """What a damaged or hostile header raises while it is read, as one BadInput."""
        try:
            yield
        except struct.error:
            raise BadInput(f"{self.name} is damaged or truncated: the file ends inside its header; "
                           "download it again") from None
        except (UnicodeDecodeError, ValueError, OverflowError, MemoryError, RecursionError) as exc:
            raise BadInput(f"{self.name} is damaged or truncated: its header is not valid GGUF ({exc})") from None

    def _unpack(self, fmt: str):
        value = struct.unpack_from(self.order + fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def _peek_length(self) -> int:
        return struct.unpack_from(self.order + "Q", self.buf, self.pos)[0]

    def _string(self, limit: int | None = None) -> str:
        n = self._unpack("Q")
        if self.pos + n > len(self.buf):
            raise ValueError("a string runs past the end of the file")
        if limit is not None and n > limit:
            raise ValueError(f"a name of {n} bytes")
        text = self.buf[self.pos:self.pos + n].decode("utf-8")
        self.pos += n
        return text

    def _value(self, type_id: int, depth: int = 0) -> Any:
        if type_id == STRING:
            if self._peek_length() > MAX_KEPT_STRING:
                skipped = SkippedString(self._peek_length(), self.pos + 8)
                self._skip(STRING, 1)
                return skipped
            return self._string()
        if type_id == ARRAY:
            if depth >= MAX_NESTING:
                raise ValueError(f"arrays nested more than {MAX_NESTING} deep")
            item_type, count = self._unpack("I"), self._unpack("Q")
            if count > MAX_ARRAY:
                raise ValueError(f"an array of {count} elements")
            if count > SMALL_ARRAY:
                skipped = SkippedArray(item_type, count, self.pos)
                self._skip(item_type, count, depth + 1)
                return skipped
            return [self._value(item_type, depth + 1) for _ in range(count)]
        if type_id not in SCALAR_FORMATS:
            raise ValueError(f"unknown metadata value type {type_id}")
        return self._unpack(SCALAR_FORMATS[type_id])

    def _skip(self, item_type: int, count: int, depth: int = 0) -> None:
        if item_type in SCALAR_FORMATS:
            self.pos += struct.calcsize(SCALAR_FORMATS[item_type]) * count
        elif item_type == STRING:
            for _ in range(count):
                self.pos += 8 + self._peek_length()
                if self.pos > len(self.buf):
                    break
        else:  # arrays of arrays: walk them
            for _ in range(count):
                self._value(item_type, depth)
                if self.pos > len(self.buf):
                    break
        if self.pos > len(self.buf):
            raise ValueError("array runs past the end of the file")
