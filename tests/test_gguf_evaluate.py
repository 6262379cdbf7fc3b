"""The GGUF evaluation gate (registry/gguf/evaluate.py) on real conversions of the tiny models of ggufmodels.py:
llama.cpp against transformers, the tokenizer gate, the perplexity gate. No catalog here: convert's registration
of an evaluation (and what `show` prints of it) is tested with the convert command."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from registry.calibration import load_calibration
from registry.errors import OperationFailed
from registry.gguf.evaluate import evaluate, gate_strings
from registry.gguf.options import ConvertOptions

pytest_plugins = ["gguf_fixtures"]

CONVERTER = Path(__file__).parents[1] / "registry" / "_vendor" / "llama_cpp" / "convert_hf_to_gguf.py"
KEYS = {"perplexity_source", "perplexity_quantized", "perplexity_ratio", "held_out_samples", "size_source",
        "size_quantized", "size_reduction", "tokenizer", "greedy", "max_logit_diff", "top1_agreement"}


@pytest.fixture(scope="module")
def sp_without_tokenizer_model(gguf_model, tmp_path_factory) -> tuple[Path, Path]:
    """The SentencePiece model with its tokenizer.model removed, converted by llama.cpp's converter directly (the
    registry refuses such a folder before converting; the converter itself writes placeholder scores without a
    word): (source folder, GGUF)."""
    root = tmp_path_factory.mktemp("gguf-no-spm")
    source = root / "sp"
    shutil.copytree(gguf_model("sp"), source)
    (source / "tokenizer.model").unlink()
    out = root / "tiny-sp.F16.gguf"
    proc = subprocess.run([sys.executable, str(CONVERTER), str(source), "--outtype", "f16", "--outfile", str(out),
                           "--model-name", "tiny-sp"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return source, out


@pytest.fixture(scope="module")
def texts():
    """What convert passes: the held-out slice of the built-in calibration set."""
    return load_calibration(None, None, 0).held_out


def _evaluate(source: Path, gguf: Path, texts: list[str], **opts):
    """convert's call: the source folder, the GGUF, the held-out text, sizes as the registry counts them."""
    source_size = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    return evaluate(source, gguf, texts, ConvertOptions(**opts), source_size, gguf.stat().st_size)


def test_f16_gguf_matches_transformers(gguf_model, sp_f16, texts, capfd):
    evaluation, warnings = _evaluate(gguf_model("sp"), sp_f16.path, texts)
    assert warnings == []
    assert set(evaluation) == KEYS
    json.loads(json.dumps(evaluation))  # stored in the provenance as it is
    assert evaluation["max_logit_diff"] < 1e-2  # float16 weights of a random model: ~1e-3
    assert evaluation["greedy"] == {"tokens": 16, "equal": 16}
    assert evaluation["top1_agreement"] > 0.99
    assert abs(evaluation["perplexity_ratio"] - 1) < 0.01
    assert evaluation["held_out_samples"] == len(texts)
    tokenizer = evaluation["tokenizer"]
    assert tokenizer["strings"] > 300 and tokenizer["mismatches"] == 0 and tokenizer["examples"] == []
    # float32 source, float16 GGUF: about half the size
    assert 0.4 < evaluation["size_reduction"] < 0.55
    assert evaluation["size_quantized"] == sp_f16.path.stat().st_size
    # Nothing on stdout (where --json output goes) and no llama.cpp chatter (its C code writes to fd 2)
    out, err = capfd.readouterr()
    assert out == ""
    assert "llama_" not in err and "ggml" not in err


@pytest.mark.parametrize("outtype", ["q8_0", "q4_k_m"])
def test_quantized_ggufs_pass_with_perplexity_near_the_source(gguf_model, gguf_file, texts, outtype):
    evaluation, warnings = _evaluate(gguf_model("sp"), gguf_file("sp", outtype).path, texts, outtype=outtype)
    assert warnings == []
    assert evaluation["tokenizer"]["mismatches"] == 0
    assert abs(evaluation["perplexity_ratio"] - 1) < 0.05
    assert evaluation["perplexity_quantized"] == pytest.approx(
        evaluation["perplexity_source"] * evaluation["perplexity_ratio"], rel=1e-3)
    assert evaluation["size_reduction"] > (0.65 if outtype == "q8_0" else 0.8)  # float32 source


def test_a_stricter_max_ppl_ratio_than_the_gguf_reaches_fails(gguf_model, sp_q4_k_m, texts):
    with pytest.raises(OperationFailed) as failed:
        _evaluate(gguf_model("sp"), sp_q4_k_m.path, texts, outtype="q4_k_m", max_ppl_ratio=0.5)
    message = str(failed.value)
    assert "\n" not in message
    assert message.startswith("GGUF perplexity ")
    assert message.endswith("above --max-ppl-ratio 0.5; nothing was registered")


@pytest.mark.parametrize("kind", ["bpe", "qwen"])
def test_byte_level_bpe_ggufs_pass_the_tokenizer_gate(gguf_model, gguf_file, texts, kind):
    """No false alarm on byte-level BPE vocabularies (pre-tokenizer read from tokenizer.json): same tokens,
    BOS handling included, for every string."""
    evaluation, warnings = _evaluate(gguf_model(kind), gguf_file(kind, "f16").path, texts)
    assert warnings == []
    assert evaluation["tokenizer"]["mismatches"] == 0
    assert evaluation["greedy"]["equal"] == 16 and evaluation["max_logit_diff"] < 1e-2


def test_sentencepiece_converted_without_tokenizer_model_fails_the_tokenizer_gate(sp_without_tokenizer_model, texts):
    with pytest.raises(OperationFailed) as failed:
        _evaluate(*sp_without_tokenizer_model, texts)
    message = str(failed.value)
    assert "\n" not in message
    assert "test strings differently from the source's tokenizer (first: " in message
    assert message.endswith("nothing was registered; --allow-tokenizer-mismatch to keep it anyway")


def test_a_wrong_pre_tokenizer_fails_the_tokenizer_gate(gguf_model, gguf_file, texts):
    """The Qwen2-regex vocabulary converted as gpt-2: Chinese text splits differently."""
    with pytest.raises(OperationFailed, match="test strings differently from the source's tokenizer"):
        _evaluate(gguf_model("qwen"), gguf_file("qwen", "f16", "gpt-2").path, texts)


def test_allow_tokenizer_mismatch_keeps_the_gguf_with_a_warning(sp_without_tokenizer_model, texts):
    evaluation, warnings = _evaluate(*sp_without_tokenizer_model, texts, allow_tokenizer_mismatch=True)
    tokenizer = evaluation["tokenizer"]
    assert 0 < tokenizer["mismatches"] < tokenizer["strings"]
    assert 1 <= len(tokenizer["examples"]) <= 3
    for example in tokenizer["examples"]:  # the tokens from the first that differs
        assert example["source"][0] != example["gguf"][0]
        assert len(example["source_pieces"]) == len(example["source"])
    assert len(warnings) == 1
    assert f"tokenizes {tokenizer['mismatches']} of {tokenizer['strings']} test strings" in warnings[0]
    assert warnings[0].endswith("kept because of --allow-tokenizer-mismatch")
    json.loads(json.dumps(evaluation))


def test_a_file_llama_cpp_cannot_load_fails(gguf_model, sp_f16, texts, tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(sp_f16.path.read_bytes()[:4096])  # a GGUF cut short
    with pytest.raises(OperationFailed, match=r"^the GGUF file does not load with llama.cpp \(.*broken\.gguf\); "
                                              "nothing was registered$"):
        _evaluate(gguf_model("sp"), broken, texts)


def test_gate_strings_are_deterministic_and_free_of_special_tokens(texts):
    strings = gate_strings(texts, ["<s>", "</s>"])
    assert strings == gate_strings(texts, ["<s>", "</s>"])
    assert len(strings) > 300 and len(set(strings)) == len(strings)
    assert any("\u4e00" <= ch <= "\u9fff" for s in strings for ch in s)  # Chinese text is in the gate
    assert not any(s != s.lstrip() or "<s>" in s or "</s>" in s for s in strings)
