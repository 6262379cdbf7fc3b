"""`registry generate`: load any registered model and stream generated text token by token."""
from __future__ import annotations

import queue
import threading
from typing import Iterator

from .catalog import base_of, require_usable, resolve
from .core import Registry
from .errors import BadInput, OperationFailed
from .export import snapshot_path


def chat_prompt(tokenizer, prompt: str) -> str:
    """The model's chat template, or the Llama-Chinese format when it has none."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return f"<s>Human: {prompt}\n</s><s>Assistant: "


def _model_dirs(reg: Registry, ref: str) -> tuple[str, str | None]:
    """(model folder, adapter folder or None): an adapter runs on top of its registered base."""
    with reg.session() as s:
        artifact = require_usable(resolve(s, ref))
        artifact_id, base = artifact.id, None
        if artifact.kind == "adapter":
            found = base_of(s, artifact)  # the lookup merge uses too: its base link, else its base_model_name_or_path
            if found is None:
                raise BadInput(f"{artifact.name} is an adapter with no registered base; import its base, then "
                               f"link it: registry link {artifact.name} BASE --role base")
            base = found.id
    if base is None:
        return str(snapshot_path(reg, artifact_id)), None
    return str(snapshot_path(reg, base)), str(snapshot_path(reg, artifact_id))


def generate(reg: Registry, ref: str, prompt: str, chat: bool = False, max_new_tokens: int = 128,
             device: str = "cpu") -> Iterator[str]:
    """Yield pieces of generated text as the model produces them (transformers TextIteratorStreamer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if device == "cuda":
        from .quantize import resolve_device

        resolve_device(device)  # no GPU here: exit 2 with the same message as quantize
    model_dir, adapter_dir = _model_dirs(reg, ref)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir or model_dir) if adapter_dir and _has_tokenizer(
        adapter_dir) else AutoTokenizer.from_pretrained(model_dir)
    from .progress import engine_output

    # A GPTQ model loads through GPTQModel, and peft imports it when installed: both talk on stdout.
    with engine_output():
        model = AutoModelForCausalLM.from_pretrained(model_dir, device_map=device)
        if adapter_dir:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter_dir)
    text = chat_prompt(tokenizer, prompt) if chat else prompt
    inputs = tokenizer(text, return_tensors="pt").to(device)
    # The timeout is a safety net: the loop below looks at the thread at least once a second.
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=1.0)
    failure: list[BaseException] = []

    def _generate() -> None:
        try:
            model.generate(**inputs, streamer=streamer, max_new_tokens=max_new_tokens, do_sample=False,
                           pad_token_id=tokenizer.eos_token_id)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread below
            failure.append(exc)
            streamer.end()  # without it the caller would wait for tokens that never come

    worker = threading.Thread(target=_generate, daemon=True, name="generate")
    worker.start()
    while True:
        try:
            piece = next(streamer)
        except StopIteration:
            break
        except queue.Empty:
            if worker.is_alive():
                continue
            break  # the thread is gone without ending the stream
        yield piece
    worker.join()
    if failure:
        exc = failure[0]
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise OperationFailed(f"generation failed: {type(exc).__name__}: {first_line}") from None


def _has_tokenizer(folder: str) -> bool:
    from pathlib import Path

    return (Path(folder) / "tokenizer_config.json").exists()
