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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


# llama.cpp's general.file_type (LLAMA_FTYPE_MOSTLY_*), named as --outtype and llama-quantize name them.
FILE_TYPE_NAMES = {0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 7: "q8_0", 8: "q5_0", 9: "q5_1", 10: "q2_k",
                   11: "q3_k_s", 12: "q3_k_m", 13: "q3_k_l", 14: "q4_k_s", 15: "q4_k_m", 16: "q5_k_s", 17: "q5_k_m",
                   18: "q6_k", 19: "iq2_xxs", 20: "iq2_xs", 21: "q2_k_s", 22: "iq3_xs", 23: "iq3_xxs", 24: "iq1_s",
                   25: "iq4_nl", 26: "iq3_s", 27: "iq3_m", 28: "iq2_s", 29: "iq2_m", 30: "iq4_xs", 31: "iq1_m",
                   32: "bf16", 36: "tq1_0", 37: "tq2_0", 38: "mxfp4_moe"}


@dataclass
class SkippedArray:
    """A metadata array too long to keep: its element type, length and where its elements start."""

    item_type: int
    count: int
    offset: int


@dataclass
class Tensor:
    name: str
    shape: tuple[int, ...]
    type: str


@dataclass
class GGUFHeader:
    version: int
    metadata: dict[str, Any]  # scalars, strings and short arrays as Python values; long arrays as SkippedArray
    tensors: list[Tensor]


def read_gguf(path: Path) -> dict[str, Any]:
    """What the registry records about a GGUF file (artifact.meta["gguf"], without "outtype" and "file")."""
    path = Path(path)
    with _open(path) as buf:
        header = _Parser(buf, path.name).header()
        md = header.metadata
        arch = md.get("general.architecture")
        tokens = md.get("tokenizer.ggml.tokens")
        bos, eos = md.get("tokenizer.ggml.bos_token_id"), md.get("tokenizer.ggml.eos_token_id")
        token_text = _Parser(buf, path.name).token_texts(tokens, {i for i in (bos, eos) if isinstance(i, int)})
    vocab_size = tokens.count if isinstance(tokens, SkippedArray) else len(tokens) if tokens is not None else None
    types: dict[str, int] = {}
    for t in header.tensors:
        types[t.type] = types.get(t.type, 0) + 1
    return {
        "architecture": arch,
        "name": md.get("general.name"),
        "file_type": md.get("general.file_type"),
        "gguf_version": header.version,
        "context_length": md.get(f"{arch}.context_length"),
        "embedding_length": md.get(f"{arch}.embedding_length"),
        "block_count": md.get(f"{arch}.block_count"),
        "tokenizer_model": md.get("tokenizer.ggml.model"),
        "pre_tokenizer": md.get("tokenizer.ggml.pre"),
        "vocab_size": vocab_size,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "bos_token": token_text.get(bos),
        "eos_token": token_text.get(eos),
        "add_bos_token": md.get("tokenizer.ggml.add_bos_token"),
        "chat_template": md.get("tokenizer.chat_template"),
        "tensor_count": len(header.tensors),
        "tensor_types": dict(sorted(types.items())),
        "parameter_count": sum(math.prod(t.shape) for t in header.tensors),
    }


def describe_gguf_files(files: dict[str, Path]) -> dict[str, Any] | None:
    """meta["gguf"] of a folder being imported or pulled ({path in the artifact: path on disk}): one .gguf file ->
    its facts (read_gguf) with "file" and "outtype"; several (a Hub repo with every quantization) -> "files",
    {path: outtype}, and no file chosen; none -> None. BadInput names a .gguf whose header does not read."""
    ggufs = sorted(rel for rel in files if rel.endswith(".gguf"))
    if not ggufs:
        return None
    facts = {}
    for rel in ggufs:
        try:
            facts[rel] = read_gguf(files[rel])
        except BadInput as exc:
            message = str(exc).replace(files[rel].name, rel, 1)  # its path in the folder, not just its name
            raise BadInput(f"{message}; remove it from the folder or replace it with the whole file") from None
    if len(ggufs) == 1:
        [(rel, one)] = facts.items()
        return {**one, "outtype": FILE_TYPE_NAMES.get(one["file_type"]), "file": rel}
    return {"files": {rel: FILE_TYPE_NAMES.get(f["file_type"]) for rel, f in facts.items()}}


def read_header(path: Path) -> GGUFHeader:
    """All of a GGUF file's metadata (long arrays skipped) and its tensor list."""
    path = Path(path)
    with _open(path) as buf:
        return _Parser(buf, path.name).header()


class _open:
    """The file mapped read-only (a GGUF may be many GB; only its header pages are read)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> mmap.mmap:
        try:
            with open(self.path, "rb") as f:
                if f.read(4) != b"GGUF":
                    raise BadInput(f"{self.path.name} is not a GGUF file (it does not start with 'GGUF')")
                self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as exc:
            raise BadInput(f"cannot read {self.path}: {exc.strerror or exc}") from None
        return self.map

    def __exit__(self, *exc) -> None:
        self.map.close()


class _Parser:
    def __init__(self, buf: mmap.mmap, name: str):
        self.buf, self.name, self.pos, self.order = buf, name, 4, "<"

    def header(self) -> GGUFHeader:
        try:
            version = self._unpack("I")
            if version & 0xFFFF == 0:  # written big-endian: 3 reads as 0x03000000
                self.order = ">"
                version = struct.unpack(">I", struct.pack("<I", version))[0]
            if version not in (2, 3):
                raise BadInput(f"{self.name} is GGUF version {version}; only versions 2 and 3 are read")
            n_tensors, n_kv = self._unpack("Q"), self._unpack("Q")
            metadata = {}
            for _ in range(n_kv):
                key = self._string()
                metadata[key] = self._value(self._unpack("I"))
            tensors = []
            for _ in range(n_tensors):
                name = self._string()
                shape = tuple(self._unpack("Q") for _ in range(self._unpack("I")))
                type_id = self._unpack("I")
                self._unpack("Q")  # offset in the data section
                tensors.append(Tensor(name, shape, GGML_TYPES.get(type_id, f"TYPE_{type_id}")))
        except (struct.error, UnicodeDecodeError, ValueError, OverflowError, MemoryError) as exc:
            raise BadInput(f"{self.name} is not a readable GGUF file (damaged or truncated header: {exc})") from None
        return GGUFHeader(version, metadata, tensors)

    def token_texts(self, tokens: Any, ids: set[int]) -> dict[int, str]:
        """The texts of the token ids asked for, from the (usually skipped) tokenizer.ggml.tokens array."""
        if isinstance(tokens, list):
            return {i: tokens[i] for i in ids if 0 <= i < len(tokens)}
        if not isinstance(tokens, SkippedArray) or tokens.item_type != STRING or not ids:
            return {}
        self.pos, found = tokens.offset, {}
        for i in range(min(tokens.count, max(ids) + 1)):
            if i in ids:
                found[i] = self._string()
            else:
                self.pos += 8 + self._peek_length()
        return found

    def _unpack(self, fmt: str):
        value = struct.unpack_from(self.order + fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def _peek_length(self) -> int:
        return struct.unpack_from(self.order + "Q", self.buf, self.pos)[0]

    def _string(self) -> str:
        n = self._unpack("Q")
        if self.pos + n > len(self.buf):
            raise ValueError("string runs past the end of the file")
        text = self.buf[self.pos:self.pos + n].decode("utf-8")
        self.pos += n
        return text

    def _value(self, type_id: int) -> Any:
        if type_id == STRING:
            return self._string()
        if type_id == ARRAY:
            item_type, count = self._unpack("I"), self._unpack("Q")
            if count > SMALL_ARRAY:
                skipped = SkippedArray(item_type, count, self.pos)
                self._skip(item_type, count)
                return skipped
            return [self._value(item_type) for _ in range(count)]
        if type_id not in SCALAR_FORMATS:
            raise ValueError(f"unknown metadata value type {type_id}")
        return self._unpack(SCALAR_FORMATS[type_id])

    def _skip(self, item_type: int, count: int) -> None:
        if item_type in SCALAR_FORMATS:
            self.pos += struct.calcsize(SCALAR_FORMATS[item_type]) * count
        elif item_type == STRING:
            for _ in range(count):
                self.pos += 8 + self._peek_length()
        else:  # arrays of arrays: walk them
            for _ in range(count):
                self._value(item_type)
        if self.pos > len(self.buf):
            raise ValueError("array runs past the end of the file")
