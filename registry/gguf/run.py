"""`registry generate` for a GGUF artifact: llama.cpp (llama-cpp-python) loads the file and streams greedy text.

Nothing here imports torch or transformers: a GGUF file carries its own tokenizer and chat template, so llama.cpp
(llama-cpp-python) alone runs it. llama_cpp itself is imported only when generating.
"""
from __future__ import annotations

import codecs
import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

from ..catalog import load, require_usable
from ..core import Registry
from ..errors import BadInput, OperationFailed
from ..progress import engine_output
from .options import chosen_gguf

# The Llama-Chinese chat format (FlagAlpha/Llama2-Chinese), for a GGUF without a chat template: the same
# fallback that `registry generate --chat` uses for a transformers model.
LLAMA_CHINESE_PROMPT = "<s>Human: {prompt}\n</s><s>Assistant: "


# -- the chat template ----------------------------------------------------------------------------------------

def render_chat_template(gguf_meta: dict[str, Any], messages: list[dict[str, str]],
                         add_generation_prompt: bool) -> str:
    """Render the GGUF's chat template (tokenizer.chat_template) as transformers' apply_chat_template does: jinja2's
    immutable sandbox (a template comes with the model: it must not reach Python objects), trim_blocks and
    lstrip_blocks, loop controls, raise_exception, strftime_now and a tojson that keeps non-ASCII text."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
               sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(gguf_meta["chat_template"]).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=gguf_meta.get("bos_token") or "", eos_token=gguf_meta.get("eos_token") or "")
    except TemplateError as exc:  # SecurityError included
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BadInput(f"the GGUF's chat template does not render ({first_line}); generate without --chat and "
                       "write the prompt in the model's format yourself") from None


def chat_prompt(gguf_meta: dict[str, Any], prompt: str) -> str:
    """The prompt as one user turn in the GGUF's chat template, or in the Llama-Chinese format when it has none."""
    if gguf_meta.get("chat_template"):
        return render_chat_template(gguf_meta, [{"role": "user", "content": prompt}], add_generation_prompt=True)
    return LLAMA_CHINESE_PROMPT.format(prompt=prompt)


# -- the artifact -----------------------------------------------------------------------------------------------

def gguf_artifact(reg: Registry, ref: str | int) -> tuple[str, int, dict[str, Any], str, list[str]]:
    """(name, id, meta["gguf"], the .gguf file's path in it, all its paths) of a usable GGUF artifact; BadInput for
    another kind (generate and export --ollama share this)."""
    with reg.read_session() as s:
        artifact = require_usable(load(s, ref))
        if artifact.kind != "gguf":
            raise BadInput(f"{artifact.name} is a {artifact.kind} model, not a GGUF file; convert it first: "
                           f"registry convert {artifact.name} --to gguf")
        name, artifact_id = artifact.name, artifact.id
        source = (artifact.source_repo, artifact.source_endpoint)
        gguf_meta = dict((artifact.meta or {}).get("gguf") or {})
        paths = sorted(f.path for f in artifact.files)
    path = chosen_gguf(gguf_meta, paths)
    if path is None:
        ggufs = [p for p in paths if p.endswith(".gguf")]
        if ggufs:  # a Hub repo pulled whole: every quantization of one model
            raise BadInput(several_ggufs(name, ggufs, *source))
        raise OperationFailed(f"{name} is registered as a GGUF artifact but holds no .gguf file; re-create it "
                              f"with registry convert")
    return name, artifact_id, gguf_meta, path, paths


def several_ggufs(name: str, ggufs: list[str], repo: str | None, endpoint: str | None = None) -> str:
    """Why an artifact of several GGUF files cannot run, and how to register the one to run."""
    shown = ", ".join(ggufs[:4]) + (", ..." if len(ggufs) > 4 else "")
    # The example: a runnable file (not a split shard, not a vision projector), by the tail --include matches.
    runnable = [p for p in ggufs if not re.search(r"-\d{5}-of-\d{5}\.gguf$", p) and "mmproj" not in p.lower()]
    base = (runnable or ggufs)[0].rsplit("/", 1)[-1]
    tail = base.split(".")[-2] + ".gguf" if base.count(".") > 1 else base
    from ..config import normalize_endpoint
    from ..hub import PUBLIC_HUB

    mirror = f" --endpoint {endpoint}" if endpoint and normalize_endpoint(endpoint) != normalize_endpoint(PUBLIC_HUB) \
        else ""
    how = (f"registry pull {repo}{mirror} --include '*{tail}' --name NAME" if repo
           else "registry import a folder that holds only that file")
    return f"{name} holds {len(ggufs)} GGUF files ({shown}); register the one to run on its own: {how}"


def gguf_file(reg: Registry, ref: str | int) -> tuple[str, dict[str, Any], Path]:
    """(name, meta["gguf"], path of the .gguf in a read-only snapshot) of a usable GGUF artifact."""
    from ..export import snapshot_path

    name, artifact_id, gguf_meta, path, _ = gguf_artifact(reg, ref)
    return name, gguf_meta, snapshot_path(reg, artifact_id) / path


def _llama_cpp():
    """llama_cpp, or BadInput naming the extra to install."""
    from .vendor import require_llama_cpp

    return require_llama_cpp()


def check_device(llama_cpp, device: str) -> None:
    """--device cuda needs a llama.cpp built with GPU offload; a CPU-only build would silently run on the CPU."""
    if device not in ("cpu", "cuda"):
        raise BadInput(f"unknown --device {device!r}; use cpu or cuda")
    if device == "cuda" and not llama_cpp.llama_supports_gpu_offload():
        raise BadInput("--device cuda: this llama-cpp-python was built for the CPU only; reinstall it with "
                       "CMAKE_ARGS=\"-DGGML_CUDA=on\" pip install --force-reinstall --no-cache-dir "
                       "'llama-cpp-python==0.3.36', or use --device cpu")


def _load(llama_cpp, path: Path, name: str, **kwargs):
    """llama_cpp.Llama on the file, its log kept off stdout (engine_output); load failures as OperationFailed."""
    try:
        with engine_output():
            return llama_cpp.Llama(model_path=str(path), verbose=False, **kwargs)
    except (ValueError, RuntimeError, OSError) as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise OperationFailed(f"llama.cpp could not load {name} ({first_line}); check its file with: "
                              f"registry verify {name}") from None


def prompt_tokens(llm, text: str) -> list[int]:
    """Token ids of `text`, special tokens parsed (so "<s>" and "<|im_start|>" in a chat template, or typed by
    the user as the transformers path allows, are the tokens, not their characters), with the BOS llama.cpp's
    tokenizer adds when the GGUF asks for one, and never two of them."""
    ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    leading = llm.tokenize(b"", add_bos=True, special=True)  # [BOS] when the GGUF's tokenizer adds one
    if leading and ids[:1] != leading[:1]:
        ids.insert(0, leading[0])
    return ids


def generate(reg: Registry, ref: str | int, prompt: str, chat: bool = False, max_new_tokens: int = 128,
             device: str = "cpu") -> Iterator[str]:
    """Yield pieces of text as llama.cpp produces them, greedily, until an end-of-generation token or
    max_new_tokens. Pieces are whole UTF-8 characters: a Chinese character split over byte tokens comes out
    once all of its bytes have."""
    llama_cpp = _llama_cpp()
    check_device(llama_cpp, device)
    name, gguf_meta, path = gguf_file(reg, ref)
    text = chat_prompt(gguf_meta, prompt) if chat else prompt
    vocab = _load(llama_cpp, path, name, vocab_only=True)
    try:
        tokens = prompt_tokens(vocab, text)
    finally:
        vocab.close()  # now, not in __del__ at interpreter exit (which can print a traceback then)
    # The context it was trained for, from the header (a vocab_only model does not load it: it says 0).
    trained = gguf_meta.get("context_length") if isinstance(gguf_meta.get("context_length"), int) else 0
    if trained and len(tokens) >= trained:
        raise BadInput(f"the prompt is {len(tokens)} tokens; {name} takes at most {trained} (its context length)")
    # A context just large enough (llama.cpp rounds it up): a long-context model's full KV cache could need
    # gigabytes for a prompt of a few words.
    n_ctx = min(len(tokens) + max_new_tokens, trained) if trained else len(tokens) + max_new_tokens
    budget = min(max_new_tokens, n_ctx - len(tokens))
    llm = _load(llama_cpp, path, name, n_ctx=n_ctx, n_gpu_layers=-1 if device == "cuda" else 0)
    try:
        yield from text_pieces(llm, _greedy(llama_cpp, llm, tokens, budget))
    except RuntimeError as exc:  # llama_decode failed (out of memory, a bad file)
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise OperationFailed(f"generation with llama.cpp failed: {first_line}") from None
    finally:
        llm.close()


def _greedy(llama_cpp, llm, tokens: list[int], limit: int) -> Iterator[int]:
    """Up to `limit` greedy tokens after `tokens`, ending before an end-of-generation token (EOS, <|im_end|>)."""
    for n, token in enumerate(llm.generate(tokens, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True)):
        if n >= limit or llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
            return
        yield token


def text_pieces(llm, tokens) -> Iterator[str]:
    """The text of a token stream, piece by piece, each piece whole UTF-8 characters: SentencePiece's byte
    tokens (<0xE4><0xBD><0xA0> for 你) and byte-level BPE tokens can end inside a character, whose bytes wait
    for the rest. Bytes that never form a character come out as U+FFFD, as transformers' decoding shows them."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    for token in tokens:
        piece = decoder.decode(llm.detokenize([token]))  # special=False: control tokens print nothing
        if piece:
            yield piece
    rest = decoder.decode(b"", final=True)
    if rest:
        yield rest
