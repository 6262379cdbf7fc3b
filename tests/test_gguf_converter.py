"""The converter side of `registry convert --to gguf`: tokenizer cases decided up front, llama.cpp's real
converter and quantizer in a subprocess, its failures as the registry's errors, and our GGUF header reader
checked against llama.cpp's own (gguf-py's GGUFReader). No catalog is involved: the registering side
(registry/gguf/convert.py) is tested with both backends in test_gguf_convert*.py.
"""
from __future__ import annotations

import ast
import json
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

pytest.register_assert_rewrite("gguf_fixtures")  # imported here before pytest_plugins loads it
from gguf_fixtures import MODEL_NAMES, convert_folder, model_files  # noqa: E402
from registry.errors import BadInput, DiskFull, OperationFailed  # noqa: E402
from registry.gguf import options, vendor  # noqa: E402
from registry.gguf.converter import check_architecture, run_converter  # noqa: E402
from registry.gguf.inspect import SkippedArray, read_gguf, read_header  # noqa: E402
from registry.gguf.tokenizer import plan_tokenizer  # noqa: E402

pytest_plugins = ["gguf_fixtures"]

HEX64 = re.compile(r"[0-9a-f]{64}")


@pytest.fixture(scope="module", autouse=True)
def _start_conversions(gguf_file):
    """The shared files this module reads, converted two at a time in the background from the start."""
    for kind, outtype in [("sp", "f16"), ("sp", "q4_k_m"), ("bpe", "f16"), ("sp", "q8_0"), ("qwen", "f16")]:
        gguf_file.start(kind, outtype)


def leftovers(work_dir: Path) -> list[str]:
    """What a conversion left in its work folder besides its log and report."""
    return sorted(p.name for p in work_dir.iterdir() if p.name not in ("convert.log", "convert-report.json"))


# --- SentencePiece: f16, q8_0, q4_k_m --------------------------------------------------------------------------

def test_sentencepiece_f16_metadata(sp_f16):
    meta = read_gguf(sp_f16.path)
    assert sp_f16.path.name == "tiny-sp.F16.gguf"
    assert meta["architecture"] == "llama" and meta["name"] == MODEL_NAMES["sp"]
    assert meta["file_type"] == options.FILE_TYPES["f16"]
    assert meta["tokenizer_model"] == "llama" and meta["pre_tokenizer"] == "default"
    assert (meta["bos_token_id"], meta["bos_token"], meta["eos_token_id"], meta["eos_token"]) == (1, "<s>", 2, "</s>")
    assert meta["add_bos_token"] is True and meta["chat_template"] is None
    assert meta["vocab_size"] == 512
    assert (meta["context_length"], meta["embedding_length"], meta["block_count"]) == (256, 256, 2)
    assert meta["tensor_types"] == {"F16": 16, "F32": 5} and meta["tensor_count"] == 21
    assert sp_f16.tokenizer["model"] == "sentencepiece" and not sp_f16.tokenizer["override"]
    assert "tokenizer.model" in sp_f16.tokenizer["handling"]
    assert sp_f16.warnings == []
    assert leftovers(sp_f16.path.parent) == [sp_f16.path.name]


def test_sentencepiece_q8_0(sp_q8_0, sp_f16):
    meta = read_gguf(sp_q8_0.path)
    assert meta["file_type"] == options.FILE_TYPES["q8_0"]
    assert meta["tensor_types"] == {"Q8_0": 16, "F32": 5}
    assert meta["parameter_count"] == read_gguf(sp_f16.path)["parameter_count"]
    assert sp_q8_0.path.stat().st_size < sp_f16.path.stat().st_size


def test_q4_k_m_is_made_of_k_quant_blocks_from_a_removed_f16(sp_q4_k_m):
    meta = read_gguf(sp_q4_k_m.path)
    assert sp_q4_k_m.path.name == "tiny-sp.Q4_K_M.gguf"
    assert meta["file_type"] == options.FILE_TYPES["q4_k_m"]
    # llama.cpp's Q4_K_M mix: most weights Q4_K, some (output, attn_v, half of ffn_down) Q6_K, norms F32.
    assert meta["tensor_types"] == {"F32": 5, "Q4_K": 13, "Q6_K": 3}
    assert sp_q4_k_m.warnings == []
    assert leftovers(sp_q4_k_m.path.parent) == [sp_q4_k_m.path.name]  # the f16 it was made from is gone


def test_k_quant_fallback_is_a_warning(tiny_model_template, tmp_path):
    """tinymodel.py's hidden size is 64: no row fills a 256-value K-quant block, llama.cpp falls back."""
    conv = convert_folder(tiny_model_template, tmp_path / "work", "q4_k_m", "tiny-64")
    types = read_gguf(conv.path)["tensor_types"]
    assert "Q4_K" not in types
    [warning] = [w for w in conv.warnings if "K-quant" in w]
    assert "not a multiple of 256" in warning and "Q5_0" in warning


# --- byte-level BPE ---------------------------------------------------------------------------------------------

def test_unrecognised_bpe_uses_the_pre_tokenizer_read_from_tokenizer_json(bpe_f16):
    meta = read_gguf(bpe_f16.path)
    assert meta["tokenizer_model"] == "gpt2" and meta["pre_tokenizer"] == "gpt-2"
    assert (meta["bos_token"], meta["eos_token"]) == ("<s>", "</s>")
    tok = bpe_f16.tokenizer
    assert tok["model"] == "bpe" and tok["override"] and not tok["requested"]
    assert HEX64.fullmatch(tok["chkhsh"])
    assert "read from tokenizer.json" in tok["handling"]
    [warning] = bpe_f16.warnings
    assert "gpt-2" in warning and tok["chkhsh"][:12] in warning


def test_qwen_style_bpe_gets_qwen2(qwen_f16):
    meta = read_gguf(qwen_f16.path)
    assert meta["pre_tokenizer"] == "qwen2" and meta["eos_token"] == "<|endoftext|>"
    assert qwen_f16.tokenizer["override"] and "Qwen2" in qwen_f16.tokenizer["handling"]


def test_named_pre_tokenizer_and_the_same_bytes_twice(gguf_model, bpe_f16, tmp_path):
    """--pre-tokenizer gpt-2 writes what the detected gpt-2 wrote: the same source and options give the same
    bytes (and so the same digest), whatever the folder or the run; a folder named like a store snapshot (a
    digest) leaves no trace in the file (gguf-py reads basename/finetune from folder names)."""
    folder = tmp_path / ("0123456789abcdef" * 4)
    shutil.copytree(gguf_model("bpe"), folder)
    conv = convert_folder(folder, tmp_path / "work", "f16", MODEL_NAMES["bpe"], pre_tokenizer="gpt-2")
    assert conv.tokenizer["requested"] and conv.tokenizer["override"]
    assert "named by --pre-tokenizer" in conv.tokenizer["handling"]
    assert conv.path.read_bytes() == bpe_f16.path.read_bytes()
    assert "0123456789abcdef" not in json.dumps(read_header(conv.path).metadata, default=str)


def test_unrecognised_bpe_without_a_name_is_refused(gguf_model, tmp_path):
    folder = tmp_path / "bpe"
    shutil.copytree(gguf_model("bpe"), folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    data["pre_tokenizer"]["add_prefix_space"] = True  # no pre-tokenizer llama.cpp implements adds a space
    (folder / "tokenizer.json").write_text(json.dumps(data))
    assert plan_tokenizer(model_files(folder), None).pre_tokenizer is None
    work = tmp_path / "work"
    with pytest.raises(BadInput, match=r"does not recognise .*chkhsh [0-9a-f]{16}.*--pre-tokenizer \(e\.g\. gpt-2"):
        convert_folder(folder, work, "f16", "odd-bpe")
    assert leftovers(work) == []


# --- refused before anything runs -------------------------------------------------------------------------------

def test_sentencepiece_from_tokenizer_json_alone_is_refused(gguf_model):
    files = model_files(gguf_model("sp"))
    del files["tokenizer.model"]
    with pytest.raises(BadInput, match="tokenizer.model is missing.*registry export"):
        plan_tokenizer(files, None)
    with pytest.raises(BadInput, match="tokenizer.model is missing"):  # naming a pre-tokenizer does not help
        plan_tokenizer(files, "gpt-2")


def test_no_tokenizer_is_refused(gguf_model):
    files = {k: v for k, v in model_files(gguf_model("sp")).items() if not k.startswith("tokenizer")}
    with pytest.raises(BadInput, match="has no tokenizer"):
        plan_tokenizer(files, None)


def test_pre_tokenizer_for_sentencepiece_is_noted_unused(gguf_model):
    plan = plan_tokenizer(model_files(gguf_model("sp")), "gpt-2")
    assert plan.model == "sentencepiece" and plan.requested
    assert "not used" in plan.notes[0]


def test_unknown_architecture_is_refused(gguf_model):
    config = json.loads((gguf_model("sp") / "config.json").read_text())
    check_architecture(config)
    config["architectures"] = ["TinyFooForCausalLM"]
    with pytest.raises(BadInput, match=r"architecture TinyFooForCausalLM is not supported by llama.cpp's "
                                       r"converter \(llama-cpp-python 0\.3\.36\)"):
        check_architecture(config)
    with pytest.raises(BadInput, match="names no architecture"):
        check_architecture({})


# --- stopping and failing ---------------------------------------------------------------------------------------

class Cancelled(Exception):
    pass


class CancelAtOnce:
    """A job's reporter whose job was cancelled: check() raises."""

    def __init__(self):
        self.checks = 0

    def check(self):
        self.checks += 1
        raise Cancelled("job cancelled")


def test_cancel_kills_the_converter_and_leaves_no_file(gguf_model, tmp_path):
    work = tmp_path / "cancelled-work"
    reporter = CancelAtOnce()
    with pytest.raises(Cancelled):
        convert_folder(gguf_model("sp"), work, "q4_k_m", "tiny-sp", reporter=reporter)
    assert reporter.checks == 1
    assert leftovers(work) == []
    alive = [p for p in Path("/proc").glob("[0-9]*") if str(work) in _cmdline(p)]
    assert alive == []


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_disk_full_is_diskfull_and_leaves_no_partial_file(gguf_model, small_fs):
    # the f16 file is 2.9 MB, the file system 2 MiB
    with pytest.raises(DiskFull, match=r"^disk full while converting tiny-sp to GGUF f16"):
        convert_folder(gguf_model("sp"), small_fs, "f16", "tiny-sp")
    assert leftovers(small_fs) == []


def test_converter_failure_is_operation_failed(gguf_model, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(gguf_model("sp"), folder)
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    work = tmp_path / "work"
    work.mkdir()
    plan = plan_tokenizer(model_files(folder), None)
    with pytest.raises(OperationFailed, match=r"^llama.cpp's converter failed: \S"):
        run_converter(folder, work, "x.F16.gguf", "f16", "broken", plan)
    assert leftovers(work) == []


# --- reading GGUF headers ---------------------------------------------------------------------------------------

# Runs in a subprocess: gguf-py (with numpy) must never be imported into the registry's own process.
GGUF_READER = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from gguf import GGUFReader
out = {}
for path in sys.argv[2:]:
    r = GGUFReader(path)
    fields = {}
    for key, field in r.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        fields[key] = {"length": len(value)} if isinstance(value, list) and len(value) > 256 else value
    tensors = [[t.name, [int(d) for d in t.shape], t.tensor_type.name] for t in r.tensors]
    out[path] = {"version": int(r.fields["GGUF.version"].contents()), "fields": fields, "tensors": tensors}
print(json.dumps(out))
"""


def test_read_header_matches_llama_cpps_gguf_reader(sp_q4_k_m, bpe_f16):
    paths = [str(sp_q4_k_m.path), str(bpe_f16.path)]
    proc = subprocess.run([sys.executable, "-c", GGUF_READER, str(vendor.VENDOR_DIR / "gguf-py"), *paths],
                          capture_output=True, text=True, check=True)
    theirs = json.loads(proc.stdout)
    for path in paths:
        ours = read_header(Path(path))
        ours_fields = {k: ({"length": v.count} if isinstance(v, SkippedArray) else v)
                       for k, v in ours.metadata.items()}
        assert ours.version == theirs[path]["version"]
        assert _floats32(ours_fields) == _floats32(theirs[path]["fields"])
        assert [[t.name, list(t.shape), t.type] for t in ours.tensors] == theirs[path]["tensors"]
    meta = read_gguf(bpe_f16.path)
    assert meta["vocab_size"] == theirs[str(bpe_f16.path)]["fields"]["tokenizer.ggml.tokens"]["length"]


def _floats32(fields: dict) -> dict:
    """float32 values compared at float32 precision (both readers widen them to Python floats)."""
    return {k: (struct.unpack("f", struct.pack("f", v))[0] if isinstance(v, float) else v) for k, v in fields.items()}


def test_read_gguf_refuses_what_is_not_gguf(tmp_path, sp_f16):
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(BadInput, match="not a GGUF file"):
        read_gguf(not_gguf)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(sp_f16.path.read_bytes()[:2000])
    with pytest.raises(BadInput, match="damaged or truncated: the file ends inside its header; download it again"):
        read_gguf(truncated)
    # A download cut short in the tensor data keeps its whole header: the tensors it lists must fit in the file.
    whole = sp_f16.path.read_bytes()
    truncated.write_bytes(whole[:-1])
    with pytest.raises(BadInput, match=f"^truncated.gguf is truncated: its tensors end at byte {len(whole):,} but "
                                       f"the file has {len(whole) - 1:,} bytes; download it again$"):
        read_gguf(truncated)
    pointer = tmp_path / "pointer.gguf"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 2901536\n")
    with pytest.raises(BadInput, match="pointer.gguf is a Git LFS pointer, not the file; fetch the file itself"):
        read_gguf(pointer)


def _gguf_bytes(kvs: list[bytes], tensors: list[tuple], data: bytes = b"", order: str = "<") -> bytes:
    """A GGUF v3 file: metadata entries (_kv), (name, shape, type id, offset) tensors, their data."""
    out = b"GGUF" + struct.pack(f"{order}IQQ", 3, len(tensors), len(kvs)) + b"".join(kvs)
    for name, shape, type_id, offset in tensors:
        out += _gguf_str(name, order) + struct.pack(f"{order}I", len(shape))
        out += b"".join(struct.pack(f"{order}Q", d) for d in shape) + struct.pack(f"{order}IQ", type_id, offset)
    return out + b"\0" * (-len(out) % 32) + data  # the data section starts aligned (general.alignment 32)


def _gguf_str(text: str | bytes, order: str = "<") -> bytes:
    raw = text if isinstance(text, bytes) else text.encode()
    return struct.pack(f"{order}Q", len(raw)) + raw


def _kv(key: str, type_id: int, payload: bytes, order: str = "<") -> bytes:
    return _gguf_str(key, order) + struct.pack(f"{order}I", type_id) + payload


def _tokens(texts: list[bytes], order: str = "<") -> bytes:
    """tokenizer.ggml.tokens: an array of strings."""
    return _kv("tokenizer.ggml.tokens", 9, struct.pack(f"{order}IQ", 8, len(texts)) +
               b"".join(_gguf_str(t, order) for t in texts), order)


@pytest.mark.parametrize("kvs, tensors, error", [
    # Each of these once hung the reader, ate memory or crashed it with a Python error instead of a refusal.
    ([], [("t", [2 ** 64 - 1] * 100_000, 0, 0)], "tensor 't' has 100000 dimensions (at most 4)"),
    ([], [("t", [2 ** 40] * 4, 0, 0)], "tensor 't' claims 1461501637330902918203684832716283019655932542976 elements"),
    ([_kv("a", 9, struct.pack("<IQ", 9, 1) * 5000 + struct.pack("<IQ", 4, 0))], [], "arrays nested more than 4 deep"),
    ([_kv("a", 9, struct.pack("<IQ", 8, 2 ** 40))], [], "an array of 1099511627776 elements"),
    ([], [("x" * 10_000, [1], 0, 0)], "a name of 10000 bytes"),
    ([], 2 ** 21, "it claims 2097152 tensors"),  # the count alone is refused: no entries written
    # A bos token that is not UTF-8, in a vocabulary long enough to be skipped and read back for its texts.
    ([_tokens([b"\xff"] + [b"t"] * 300), _kv("tokenizer.ggml.bos_token_id", 4, struct.pack("<I", 0))], [],
     "'utf-8' codec can't decode byte 0xff"),
])
def test_read_gguf_refuses_hostile_headers_at_once(tmp_path, kvs, tensors, error):
    path = tmp_path / "hostile.gguf"
    if isinstance(tensors, int):
        path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, tensors, 0))
    else:
        path.write_bytes(_gguf_bytes(kvs, tensors))
    with pytest.raises(BadInput) as refused:
        read_gguf(path)
    assert str(refused.value).startswith("hostile.gguf is damaged or truncated: its header is not valid GGUF (")
    assert error in str(refused.value)


def test_read_gguf_records_only_values_of_the_expected_type(tmp_path):
    """A header may say anything: a NaN context length or an array file type is not recorded (JSON has no NaN)."""
    path = tmp_path / "odd.gguf"
    path.write_bytes(_gguf_bytes([
        _kv("general.architecture", 8, _gguf_str("llama")),
        _kv("llama.context_length", 6, struct.pack("<f", float("nan"))),
        _kv("general.file_type", 9, struct.pack("<IQI", 4, 1, 1)),
        _kv("tokenizer.ggml.bos_token_id", 9, struct.pack("<IQI", 4, 1, 1)),
        _kv("tokenizer.ggml.add_bos_token", 4, struct.pack("<I", 1)),
    ], [("w", [4, 2], 0, 0)], b"\0" * 32))
    meta = read_gguf(path)
    assert meta["architecture"] == "llama" and meta["parameter_count"] == 8
    assert (meta["context_length"], meta["file_type"], meta["bos_token_id"], meta["add_bos_token"]) == (None,) * 4
    json.dumps(meta, allow_nan=False)
    # Token "texts" that are floats; a vocabulary that is one long string instead of an array.
    path.write_bytes(_gguf_bytes([
        _kv("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 6, 2) + struct.pack("<ff", float("nan"), float("inf"))),
        _kv("tokenizer.ggml.bos_token_id", 4, struct.pack("<I", 0)),
        _kv("tokenizer.ggml.eos_token_id", 4, struct.pack("<I", 1))], []))
    meta = read_gguf(path)
    assert (meta["bos_token_id"], meta["bos_token"], meta["eos_token"]) == (0, None, None)
    json.dumps(meta, allow_nan=False)
    path.write_bytes(_gguf_bytes([_kv("tokenizer.ggml.tokens", 8, _gguf_str("x" * (2 << 20))),
                                  _kv("tokenizer.ggml.bos_token_id", 4, struct.pack("<I", 0))], []))
    meta = read_gguf(path)
    assert (meta["vocab_size"], meta["bos_token"]) == (None, None)


def test_read_gguf_reads_a_big_endian_file_in_its_byte_order(tmp_path):
    path = tmp_path / "big.gguf"
    path.write_bytes(_gguf_bytes([
        _kv("general.architecture", 8, _gguf_str("llama", ">"), ">"),
        _tokens([b"<unk>", b"<s>", b"</s>"] + [b"t%d" % i for i in range(300)], ">"),
        _kv("tokenizer.ggml.bos_token_id", 4, struct.pack(">I", 1), ">"),
        _kv("tokenizer.ggml.eos_token_id", 4, struct.pack(">I", 2), ">"),
    ], [("w", [4], 0, 0)], b"\0" * 16, ">"))
    meta = read_gguf(path)
    assert (meta["architecture"], meta["vocab_size"], meta["bos_token"], meta["eos_token"]) == ("llama", 303, "<s>",
                                                                                                "</s>")
    assert meta["gguf_version"] == 3 and meta["parameter_count"] == 4


# --- the vendored converter ------------------------------------------------------------------------------------

def test_supported_architectures_and_versions():
    archs = vendor.supported_architectures()
    assert {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Gemma2ForCausalLM"} <= archs
    assert "TinyFooForCausalLM" not in archs
    # Read from TEXT_MODEL_MAP alone: every name there is one a converter module registers.
    registered = set()
    for module in (vendor.VENDOR_DIR / "conversion").glob("*.py"):
        for node in ast.walk(ast.parse(module.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "register"
                    and getattr(node.func.value, "id", None) == "ModelBase"):
                registered |= {a.value for a in node.args if isinstance(a, ast.Constant)}
    assert len(archs) > 250 and archs <= registered
    assert vendor.converter_versions() == {"llama_cpp_python": "0.3.36", "gguf_py": "0.19.0"}


def test_pre_tokenizer_names_are_ones_the_converter_writes():
    """Every --pre-tokenizer name is one the vendored converter writes itself (get_vocab_base_pre), or
    "default": so llama.cpp of the same version loads it (checked against src/llama-vocab.cpp when vendored)."""
    source = (vendor.VENDOR_DIR / "conversion" / "base.py").read_text(encoding="utf-8")
    written = {node.value.value for node in ast.walk(ast.parse(source))
               if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["res"]
               and isinstance(node.value, ast.Constant)}
    assert set(options.PRE_TOKENIZERS) - {"default"} <= written
    assert len(set(options.PRE_TOKENIZERS)) == len(options.PRE_TOKENIZERS)
