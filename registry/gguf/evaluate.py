"""The evaluation gate of `registry convert --to gguf`: does llama.cpp, given the GGUF, see the source model?

Three checks, cheapest first, each against the source folder's own Hugging Face tokenizer and transformers model:
- tokenizer: llama.cpp's tokenization of fixed Chinese and English strings, of every held-out text and of a few
  hundred windows of them must equal the source tokenizer's. A wrong vocabulary conversion (a SentencePiece model converted
  without its tokenizer.model, a wrong pre-tokenizer) converts silently and differs only on some strings, so the
  gate reads many. A mismatch fails the conversion unless the user allows it.
- perplexity on the held-out text, both models fed the SAME token ids (the source tokenizer's), so the ratio
  measures the weights alone; above --max-ppl-ratio the conversion fails, as quantize's gate does.
- for the record: greedy tokens from one prompt, the largest logit difference on one text and the share of
  positions whose most likely next token agrees.

The GGUF is run first and its results kept (small arrays), then freed before the float32 source is loaded, so
the two models never sit in memory together.
"""
from __future__ import annotations

import contextlib
import gc
import math
import os
import random
import re
from pathlib import Path
from typing import Any, Callable

from ..errors import BadInput, OperationFailed
from ..progress import engine_output
from .options import ConvertOptions

# Strings every conversion must tokenize as the source does: Chinese, English, digits, mixed scripts, code,
# whitespace. None starts with a space: transformers' Metaspace tokenizers ("prepend_scheme": "first") drop one
# "▁" there where SentencePiece and llama.cpp keep it, a known difference that is no conversion error.
FIXED_STRINGS = (
    "你好，世界！",
    "模型注册表记录每个文件的校验和与来源。",
    "请用一句话解释什么是大语言模型。",
    "中文和English混合的句子，还有数字 2048 和 3.14。",
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! Numbers like 12345 and 0.5 are common.",
    "Double  spaces,\ttabs and\nnew lines.",
    "def add(a, b):\n    return a + b\n",
)
WINDOWS = 400  # windows of the held-out text: a wrong vocabulary may show on only a few percent of short strings
WINDOW_CHARS = (5, 40)
WINDOW_SEED = 0  # fixed: the same text gives the same strings, so an evaluation can be repeated exactly
EXAMPLES = 3  # mismatches kept in the result
EXAMPLE_TOKENS = 6  # tokens of each, from the first that differs
MAX_SEQ_LEN = 512  # held-out texts are cut to this many tokens (or the model's context), as quantize's default
GREEDY_PROMPT = "人类：请介绍一下你自己。\nHuman: Tell me about model registries.\nAssistant:"
GREEDY_TOKENS = 16
SMALL_MODEL_BYTES = 64 << 20  # below: evaluated on one thread (see _threads)


def evaluate(source_dir: Path, gguf_path: Path, texts: list[str], opts: ConvertOptions, source_size: int,
             gguf_size: int, check: Callable[[], None] | None = None) -> tuple[dict[str, Any], list[str]]:
    """Compare the GGUF (llama.cpp) with its source (transformers, float32, CPU) on `texts`.

    Returns (evaluation, warnings); raises OperationFailed when the tokenizer or the perplexity gate fails.
    `check` (a job reporter's) is called between texts and may raise: a cancelled job stops within a text.
    """
    check = check or (lambda: None)
    tokenizer, config = load_source_config(source_dir)
    seq_len = min(MAX_SEQ_LEN, getattr(config, "max_position_embeddings", None) or MAX_SEQ_LEN)
    eval_ids = [ids for ids in (_ids(tokenizer, text)[:seq_len] for text in texts) if len(ids) >= 2]
    if not eval_ids:
        raise BadInput("the held-out evaluation text has no tokens; give a longer calibration file")
    prompt_ids = _ids(tokenizer, GREEDY_PROMPT)[:max(1, seq_len - GREEDY_TOKENS)]
    strings = gate_strings(texts, _special_strings(tokenizer))
    source_tokens = [_ids(tokenizer, s) for s in strings]

    warnings: list[str] = []
    gguf = _run_gguf(gguf_path, strings, eval_ids, prompt_ids, seq_len, _threads(gguf_size), check)
    tokenizer_result = _compare_tokens(strings, source_tokens, gguf["tokens"], _pieces_of(tokenizer))
    if tokenizer_result["mismatches"]:
        first = tokenizer_result["examples"][0]
        what = (f"the GGUF tokenizes {tokenizer_result['mismatches']} of {tokenizer_result['strings']} test "
                f"strings differently from the source's tokenizer (first: {first['text']!r} from token "
                f"{first['token']}: source {first['source_pieces']} vs GGUF {first['gguf_pieces']})")
        if not opts.allow_tokenizer_mismatch:
            raise OperationFailed(f"{what}; nothing was registered; --allow-tokenizer-mismatch to keep it anyway")
        warnings.append(f"{what}; kept because of --allow-tokenizer-mismatch")

    source = _run_source(source_dir, eval_ids, prompt_ids, _threads(source_size), check)
    ppl_g = math.exp(gguf["nll"] / gguf["count"])
    ppl_s = math.exp(source["nll"] / source["count"])
    ratio = ppl_g / ppl_s
    result = {"perplexity_source": round(ppl_s, 4), "perplexity_quantized": round(ppl_g, 4),
              "perplexity_ratio": round(ratio, 4), "held_out_samples": len(texts),
              "size_source": source_size, "size_quantized": gguf_size,
              "size_reduction": round(1 - gguf_size / source_size, 4) if source_size else 0.0,
              "tokenizer": tokenizer_result, **_agreement(gguf, source)}
    if ratio > opts.max_ppl_ratio:
        raise OperationFailed(f"GGUF perplexity {ppl_g:.3f} is {ratio:.2f}x the source's {ppl_s:.3f}, above "
                              f"--max-ppl-ratio {opts.max_ppl_ratio}; nothing was registered")
    return result, warnings


def _agreement(gguf: dict[str, Any], source: dict[str, Any]) -> dict[str, Any]:
    """greedy (equal tokens up to the first difference), max_logit_diff (first text), top1_agreement (all)."""
    equal = 0
    for a, b in zip(gguf["greedy"], source["greedy"]):
        if a != b:
            break
        equal += 1
    width = min(gguf["first_logits"].shape[1], source["first_logits"].shape[1])
    logit_diff = abs(gguf["first_logits"][:, :width] - source["first_logits"][:, :width]).max()
    agree = sum(int((a == b).sum()) for a, b in zip(gguf["argmax"], source["argmax"]))
    positions = sum(len(a) for a in source["argmax"])
    return {"greedy": {"tokens": GREEDY_TOKENS, "equal": equal}, "max_logit_diff": round(float(logit_diff), 6),
            "top1_agreement": round(agree / positions, 4)}


def load_source_config(source_dir: Path):
    """The source's tokenizer and config as transformers loads them, or BadInput: a model transformers cannot load
    (a model type it does not know, one that needs trust_remote_code) converts, but cannot be evaluated. convert
    calls this before converting, so the answer comes before minutes of work."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        with engine_output():
            return AutoTokenizer.from_pretrained(source_dir), AutoConfig.from_pretrained(source_dir)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types here; all mean the same
        raise BadInput(f"the evaluation cannot load the source with transformers ({_first_line(exc)}); convert it "
                       "with --no-eval to skip the evaluation") from None


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"


def gate_strings(texts: list[str], specials: list[str], windows: int = WINDOWS,
                 seed: int = WINDOW_SEED) -> list[str]:
    """FIXED_STRINGS, every held-out text, and `windows` random windows of them; deterministic, no duplicates.

    Texts are first cut at special-token strings ("<s>", "</s>", ...): transformers reads those as special
    tokens inside text and llama.cpp's plain tokenization does not, which is no conversion error. Leading
    whitespace is dropped for the reason given at FIXED_STRINGS.
    """
    pattern = re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True))) if specials \
        else None
    pieces = [p.strip() for text in texts for p in (pattern.split(text) if pattern else [text])]
    pieces = [p for p in pieces if p]
    found = list(FIXED_STRINGS) + pieces
    rng = random.Random(seed)
    lo, hi = WINDOW_CHARS
    for _ in range(windows if pieces else 0):
        piece = rng.choice(pieces)
        length = rng.randint(lo, hi)
        start = rng.randrange(max(1, len(piece) - lo + 1))
        window = piece[start:start + length].lstrip()
        if window:
            found.append(window)
    return list(dict.fromkeys(found))


def _special_strings(tokenizer) -> list[str]:
    found = set(getattr(tokenizer, "all_special_tokens", None) or [])
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        found.add(str(getattr(token, "content", token)))
    return [s for s in found if s]


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text).input_ids)


def _compare_tokens(strings: list[str], source: list[list[int]], gguf: list[list[int]], pieces) -> dict[str, Any]:
    """Count the strings tokenized differently; for the first few, the tokens from the first difference on (ids,
    and the pieces they stand for in the source's vocabulary, which the GGUF carries)."""
    examples = []
    for text, a, b in zip(strings, source, gguf):
        if a == b:
            continue
        at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        end = at + EXAMPLE_TOKENS
        examples.append({"text": text[:60], "token": at, "source": a[at:end], "gguf": b[at:end],
                         "source_pieces": pieces(a[at:end]), "gguf_pieces": pieces(b[at:end])})
    return {"strings": len(strings), "mismatches": len(examples), "examples": examples[:EXAMPLES]}


def _pieces_of(tokenizer):
    def pieces(ids: list[int]) -> list[str]:
        return [str(p) for p in tokenizer.convert_ids_to_tokens(ids)]
    return pieces


def _threads(model_bytes: int) -> int:
    """All the cores this process may use for a real model; one for a tiny one (a test model), whose steps take
    microseconds and gain nothing from threads but their synchronisation, which on a busy machine costs most:
    2 threads ran 20x slower than 1 on a loaded 2-core box, for torch and llama.cpp alike."""
    if model_bytes < SMALL_MODEL_BYTES:
        return 1
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def _torch_threads(n: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(min(n, before))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _score(logits, ids: list[int]):
    """(summed NLL of ids[1:], their count, argmax per position) from logits (n, vocab), in float64."""
    import numpy as np

    x = np.asarray(logits, dtype=np.float64)
    top = x.max(axis=1)
    log_norm = top + np.log(np.exp(x - top[:, None]).sum(axis=1))
    targets = np.asarray(ids[1:])
    nll = float((log_norm[:-1] - x[np.arange(len(targets)), targets]).sum())
    return nll, len(targets), x.argmax(axis=1)


def _run_gguf(path: Path, strings: list[str], eval_ids: list[list[int]], prompt_ids: list[int], seq_len: int,
              threads: int, check: Callable[[], None]) -> dict[str, Any]:
    """Everything the gate needs from llama.cpp, with the model loaded once."""
    import numpy as np

    with engine_output():
        try:
            import llama_cpp
        except ImportError:
            raise BadInput("GGUF needs llama.cpp: pip install 'registry[gguf]' (llama-cpp-python 0.3.36)") from None
        try:
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=seq_len, n_batch=seq_len, n_threads=threads,
                                  n_threads_batch=threads, logits_all=True, verbose=False)
        except Exception as exc:  # any failure to load is the answer: the file is not usable
            reason = str(exc).replace(str(path), path.name)  # the temporary path is gone once the job ends
            raise OperationFailed(f"the GGUF file does not load with llama.cpp ({reason}); nothing was registered") \
                from None
        try:
            tokens = [llm.tokenize(s.encode("utf-8"), add_bos=True, special=False) for s in strings]
            vocab = llm.n_vocab()
            nll, count, argmax, first = 0.0, 0, [], None
            for ids in eval_ids:
                check()
                llm.reset()
                llm.eval(ids)
                logits = np.array(llm.scores[:len(ids), :vocab], dtype=np.float32)
                n, c, top = _score(logits, ids)
                nll, count = nll + n, count + c
                argmax.append(top)
                if first is None:
                    first = logits
            greedy = []
            llm.reset()
            llm.eval(prompt_ids)
            for i in range(GREEDY_TOKENS):
                greedy.append(int(np.argmax(llm.scores[llm.n_tokens - 1, :vocab])))
                if i + 1 < GREEDY_TOKENS:
                    llm.eval([greedy[-1]])
        finally:
            llm.close()
            del llm
    return {"tokens": tokens, "nll": nll, "count": count, "argmax": argmax, "first_logits": first,
            "greedy": greedy}


def _run_source(source_dir: Path, eval_ids: list[list[int]], prompt_ids: list[int], threads: int,
                check: Callable[[], None]) -> dict[str, Any]:
    """The same from the source with transformers, float32 on the CPU (the reference the GGUF must match)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with engine_output():
            model = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - as load_source_config
        raise OperationFailed(f"the evaluation cannot load the source with transformers ({_first_line(exc)}); "
                              "convert it with --no-eval to skip the evaluation") from None
    model.eval()
    try:
        nll, count, argmax, first = 0.0, 0, [], None
        with torch.no_grad(), _torch_threads(threads):
            for ids in eval_ids:
                check()
                logits = model(torch.tensor([ids]), use_cache=False).logits[0].float().numpy()
                n, c, top = _score(logits, ids)
                nll, count = nll + n, count + c
                argmax.append(top)
                if first is None:
                    first = logits
            # Without a KV cache (whose argument name changed across transformers versions): 16 short passes
            # cost little beside the perplexity run.
            greedy: list[int] = []
            for _ in range(GREEDY_TOKENS):
                logits = model(torch.tensor([prompt_ids + greedy]), use_cache=False).logits
                greedy.append(int(logits[0, -1].argmax()))
    finally:
        del model
        gc.collect()
    return {"nll": nll, "count": count, "argmax": argmax, "first_logits": first, "greedy": greedy}
