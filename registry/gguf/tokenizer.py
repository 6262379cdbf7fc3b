"""Which tokenizer case a source is, decided from its files before anything heavy runs.

llama.cpp's converter handles three cases very differently (docs/notes/gguf-facts.md, section 6):
- a SentencePiece vocabulary with its `tokenizer.model`: converted exactly (scores, byte fallback);
- a Llama SentencePiece vocabulary with only `tokenizer.json`: converted SILENTLY with placeholder scores, and
  llama.cpp then splits some text differently; refused here;
- a byte-level BPE vocabulary: the converter recognises the pre-tokenizer only by hashing how the vocabulary
  splits a fixed text, so any custom-trained vocabulary is unknown to it and refused, unless a pre-tokenizer is
  named (--pre-tokenizer) or can be read off tokenizer.json's own pre_tokenizer.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BadInput

# The split regexes of the pre-tokenizers llama.cpp implements (src/llama-vocab.cpp) as tokenizers writes them
# in tokenizer.json (Split with behavior Isolated, then ByteLevel without its own regex).
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_REGEXES = {LLAMA3_REGEX: ("llama-bpe", "Llama 3's split regex"), QWEN2_REGEX: ("qwen2", "Qwen2's split regex")}


@dataclass
class TokenizerPlan:
    """How the source's tokenizer will be converted."""

    model: str  # "sentencepiece", "bpe" (byte-level), "unigram", "wordpiece" or "other"
    # The pre-tokenizer to write when the converter does not recognise a BPE vocabulary: the user's
    # --pre-tokenizer, else one read off tokenizer.json, else None (the converter then refuses the vocabulary).
    pre_tokenizer: str | None = None
    requested: bool = False  # the user named pre_tokenizer
    notes: list[str] = field(default_factory=list)  # where pre_tokenizer came from; what will not be used


def plan_tokenizer(files: dict[str, Path], pre_tokenizer: str | None) -> TokenizerPlan:
    """The tokenizer case of a source given its files ({path in the artifact: path on disk}); BadInput for a
    source without a tokenizer and for a Llama SentencePiece vocabulary without its tokenizer.model."""
    tokenizer_json = _read_json(files, "tokenizer.json")
    if "tokenizer.model" in files and not _is_tiktoken(files["tokenizer.model"]):
        plan = TokenizerPlan("sentencepiece", pre_tokenizer, pre_tokenizer is not None)
        if pre_tokenizer is not None:
            plan.notes.append(f"--pre-tokenizer {pre_tokenizer} is not used: the vocabulary is SentencePiece "
                              "(tokenizer.model), which has no pre-tokenizer")
        return plan
    if tokenizer_json is None:
        if "vocab.json" in files and "merges.txt" in files:  # GPT-2's own file layout, byte-level BPE
            return _bpe_plan(None, pre_tokenizer)
        if "tokenizer.model" in files:  # tiktoken's format (Llama 3's original release, Kimi)
            return TokenizerPlan("other", pre_tokenizer, pre_tokenizer is not None)
        raise BadInput("the model has no tokenizer (tokenizer.model or tokenizer.json) and a GGUF file must "
                       "carry its vocabulary; add the tokenizer files the model was trained with to the folder "
                       "and import it again")
    model = tokenizer_json.get("model") or {}
    kind = model.get("type")
    if _is_llama_sentencepiece(tokenizer_json):
        raise BadInput("the model's tokenizer is a Llama SentencePiece vocabulary (byte fallback) but "
                       "tokenizer.model is missing: from tokenizer.json alone llama.cpp's converter writes "
                       "placeholder scores and llama.cpp then splits text differently. Add tokenizer.model: "
                       "registry export REF DIR, copy the model's original tokenizer.model into DIR, "
                       "registry import DIR, and convert that")
    if kind == "BPE":
        return _bpe_plan(tokenizer_json, pre_tokenizer)
    plan = TokenizerPlan({"Unigram": "unigram", "WordPiece": "wordpiece"}.get(kind, "other"), pre_tokenizer,
                         pre_tokenizer is not None)
    return plan


def _bpe_plan(tokenizer_json: dict[str, Any] | None, pre_tokenizer: str | None) -> TokenizerPlan:
    if pre_tokenizer is not None:
        return TokenizerPlan("bpe", pre_tokenizer, True, ["named by --pre-tokenizer"])
    detected = detect_pre_tokenizer(tokenizer_json) if tokenizer_json is not None else None
    if detected is None:
        return TokenizerPlan("bpe")
    name, why = detected
    return TokenizerPlan("bpe", name, False, [f"read from tokenizer.json's pre_tokenizer ({why})"])


def detect_pre_tokenizer(tokenizer_json: dict[str, Any]) -> tuple[str, str] | None:
    """(llama.cpp pre-tokenizer name, why) when tokenizer.json's pre_tokenizer is exactly one llama.cpp
    implements, else None: ByteLevel with its own (GPT-2) regex -> gpt-2; Split with Llama 3's or Qwen2's
    regex followed by a ByteLevel without regex -> llama-bpe or qwen2."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    if not isinstance(steps, list) or not steps or not all(isinstance(s, dict) for s in steps):
        return None
    if len(steps) == 1 and _is_byte_level(steps[0], with_regex=True):
        return "gpt-2", "ByteLevel with GPT-2's regex"
    if len(steps) == 2 and steps[0].get("type") == "Split" and _is_byte_level(steps[1], with_regex=False):
        split = steps[0]
        pattern = (split.get("pattern") or {}).get("Regex")
        if split.get("behavior") == "Isolated" and not split.get("invert") and pattern in SPLIT_REGEXES:
            return SPLIT_REGEXES[pattern]
    return None


def _is_byte_level(step: dict[str, Any], with_regex: bool) -> bool:
    # add_prefix_space would prepend a space llama.cpp's pre-tokenizers do not add.
    return (step.get("type") == "ByteLevel" and not step.get("add_prefix_space", False)
            and bool(step.get("use_regex", True)) == with_regex)


def _is_llama_sentencepiece(tokenizer_json: dict[str, Any]) -> bool:
    """The converter's own test (gguf-py's LlamaHfVocab): a BPE model with byte fallback and a Sequence decoder
    is a SentencePiece vocabulary that transformers turned into tokenizer.json."""
    model = tokenizer_json.get("model") or {}
    decoder = tokenizer_json.get("decoder") or {}
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and decoder.get("type") == "Sequence"


def _is_tiktoken(path: Path) -> bool:
    """tiktoken's tokenizer.model is text lines `<base64> <rank>`; SentencePiece's is a binary protobuf."""
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError:
        return False
    first = head.split(b"\n", 1)[0].split(b" ")
    return len(first) == 2 and first[1].isdigit() and all(32 < c < 127 for c in first[0])


def _read_json(files: dict[str, Path], name: str) -> dict[str, Any] | None:
    path = files.get(name)
    if path is None:
        return None
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BadInput(f"{name} does not read as JSON ({exc}); repair or re-import the model") from None
    if not isinstance(data, dict):
        raise BadInput(f"{name} is not a JSON object; repair or re-import the model")
    return data
