"""What a GGUF conversion may ask for, and the checks that need neither torch nor the weights.

The CLI and the server (submit.py) check requests here before a job is queued, in processes that should not
load torch or llama.cpp.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any

from ..errors import BadInput

# Every --outtype: the first three are written by llama.cpp's converter itself; the K-quants are made from its
# f16 output by llama.cpp's quantizer (llama_model_quantize), as llama.cpp's own llama-quantize does.
OUTTYPES = ("f16", "bf16", "q8_0", "q4_k_m", "q5_k_m", "q6_k")
CONVERTER_OUTTYPES = ("f16", "bf16", "q8_0")
# llama_ftype of each outtype (= the GGUF's general.file_type, = gguf.LlamaFileType).
FILE_TYPES = {"f16": 1, "bf16": 32, "q8_0": 7, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
# The tensor type most weights of a K-quant should have; fewer means llama.cpp fell back (rows not a multiple
# of its 256-wide blocks).
K_QUANT_TENSOR_TYPE = {"q4_k_m": "Q4_K", "q5_k_m": "Q5_K", "q6_k": "Q6_K"}
# --pre-tokenizer names a byte-level BPE vocabulary's pre-tokenizer when llama.cpp's converter does not recognise
# the vocabulary. Valid: the names the vendored converter itself writes (conversion/base.py get_vocab_base_pre)
# that llama.cpp's loader accepts for a BPE vocabulary (src/llama-vocab.cpp, llama.cpp of llama-cpp-python 0.3.36),
# plus "default"; the common ones first. (The loader's aliases llama3/llama-v3 are left out: the converter writes
# llama-bpe.)
PRE_TOKENIZERS = (
    "default", "gpt-2", "llama-bpe", "qwen2", "a.x-4.0", "afmoe", "bailingmoe", "bailingmoe2", "bloom", "chameleon",
    "chatglm-bpe", "codeshell", "cohere2moe", "command-r", "dbrx", "deepseek-coder", "deepseek-llm",
    "deepseek-r1-qwen", "deepseek-v3", "exaone", "exaone-moe", "exaone4", "f2llmv2", "falcon", "falcon-h1",
    "falcon3", "gemma4", "gigachat", "glm4", "gpt-4o", "gpt3-finnish", "granite-docling",
    "granite-embed-multi-311m", "granite-embed-multi-97m", "grok-2", "hunyuan", "hunyuan-dense", "hy_v4", "jais",
    "jais-2", "jina-v1-en", "jina-v2-code", "jina-v2-de", "jina-v2-es", "jina-v5-nano", "joyai-llm", "kanana2",
    "kimi-k2", "kormo", "laguna", "lfm2", "llama4", "megrez", "mellum", "mellum2", "midm-2.0", "minerva-7b",
    "minicpm5", "minimax-m2", "modern-bert", "mpt", "olmo", "phi-2", "pixtral", "poro-chat", "qwen35", "refact",
    "roberta-bpe", "sarvam-moe", "seed-coder", "smaug-bpe", "smollm", "solar-open", "spark2_5", "stablelm2",
    "starcoder", "superbpe", "talkie", "tekken", "tiny_aya", "trillion", "ufakzeka", "viking", "youtu",
)


@dataclass
class ConvertOptions:
    """How to convert; everything here is recorded in the artifact's provenance."""

    outtype: str = "f16"
    pre_tokenizer: str | None = None  # None: the converter's own detection, else refused when it knows none
    evaluate: bool = True
    max_ppl_ratio: float = 1.5
    allow_tokenizer_mismatch: bool = False


def check_options(opts: ConvertOptions) -> None:
    """Refuse options no model could take."""
    if opts.outtype not in OUTTYPES:
        raise BadInput(f"unknown --outtype {opts.outtype!r}; use one of: {', '.join(OUTTYPES)}")
    if opts.pre_tokenizer is not None and opts.pre_tokenizer not in PRE_TOKENIZERS:
        close = difflib.get_close_matches(opts.pre_tokenizer, PRE_TOKENIZERS, n=3)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise BadInput(f"unknown --pre-tokenizer {opts.pre_tokenizer!r}; {hint}use one of the {len(PRE_TOKENIZERS)} "
                       "llama.cpp knows (e.g. gpt-2, llama-bpe, qwen2; all: registry convert --help)")
    if not opts.max_ppl_ratio > 0:
        raise BadInput(f"--max-ppl-ratio {opts.max_ppl_ratio} is not valid; give a number above 0")


def check_convertible(artifact) -> None:
    """Refuse an adapter, a GGUF or a GPTQ model (anything with an Artifact's name, kind and meta).

    A GPTQ source is refused rather than dequantized: a GGUF of dequantized int4 weights carries GPTQ's rounding
    error, and a K-quant of it rounds twice; the full-precision model it came from converts without either.
    """
    if artifact.kind == "adapter":
        raise BadInput(f"{artifact.name} is an adapter; merge it into its base first (registry merge BASE "
                       f"{artifact.name}), then convert the merged model")
    if artifact.kind == "gguf":
        raise BadInput(f"{artifact.name} is already a GGUF file; convert its source instead")
    if artifact.kind == "quantized" or "quantization_config" in (artifact.meta or {}):
        raise BadInput(f"{artifact.name} is GPTQ-quantized; convert the full-precision model it was made from "
                       "(registry show shows it under 'derived from')")


def gguf_name(source_name: str, outtype: str) -> str:
    """convert's default artifact name: SOURCE-gguf-OUTTYPE."""
    return f"{source_name}-gguf-{outtype}"


def file_stem(name: str) -> str:
    """An artifact name's last segment as a file or folder name: letters, digits, '.', '_' and '-' only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name.rsplit("/", 1)[-1]).strip("-.") or "model"


def chosen_gguf(gguf_meta: dict[str, Any], paths: list[str]) -> str | None:
    """The .gguf file a GGUF artifact runs: the one its metadata names, else its only .gguf; None when it holds
    several (a Hub repo pulled whole) or none."""
    if gguf_meta.get("file") in paths:
        return gguf_meta["file"]
    ggufs = [p for p in paths if p.endswith(".gguf")]
    return ggufs[0] if len(ggufs) == 1 else None


def gguf_filename(source_name: str, outtype: str) -> str:
    """The one file of a GGUF artifact, named as on the Hub (`llama-7b-chat.Q4_K_M.gguf`): from the source's name
    and the outtype only, so the same source and options give the same digest (which covers file names)."""
    return f"{file_stem(source_name)}.{outtype.upper()}.gguf"
