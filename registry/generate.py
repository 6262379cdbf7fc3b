"""`registry generate`: load any registered model and stream generated text token by token."""
from __future__ import annotations

import threading
from typing import Iterator

from sqlalchemy import select

from .catalog import resolve
from .core import Registry
from .errors import BadInput
from .export import snapshot_path
from .models import Artifact, Edge


def chat_prompt(tokenizer, prompt: str) -> str:
    """The model's chat template, or the Llama-Chinese format when it has none."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return f"<s>Human: {prompt}\n</s><s>Assistant: "


def _model_dirs(reg: Registry, ref: str) -> tuple[str, str | None]:
    """(model folder, adapter folder or None): an adapter runs on top of its registered base."""
    with reg.session() as s:
        artifact = resolve(s, ref)
        digest, base = artifact.digest, None
        if artifact.kind == "adapter":
            base = s.scalars(select(Artifact.digest).join(Edge, Edge.parent_id == Artifact.id).where(
                Edge.child_id == artifact.id, Edge.role == "base", Artifact.status != "deleted")).first()
            if base is None:
                raise BadInput(f"{artifact.name} is an adapter with no registered base; import its base and "
                               "link it with registry import --base")
    if base is None:
        return str(snapshot_path(reg, digest)), None
    return str(snapshot_path(reg, base)), str(snapshot_path(reg, digest))


def generate(reg: Registry, ref: str, prompt: str, chat: bool = False, max_new_tokens: int = 128,
             device: str = "cpu") -> Iterator[str]:
    """Yield pieces of generated text as the model produces them (transformers TextIteratorStreamer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model_dir, adapter_dir = _model_dirs(reg, ref)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir or model_dir) if adapter_dir and _has_tokenizer(
        adapter_dir) else AutoTokenizer.from_pretrained(model_dir)
    from .progress import engine_output

    with engine_output():  # a GPTQ model loads through GPTQModel, which talks on stdout
        model = AutoModelForCausalLM.from_pretrained(model_dir, device_map=device)
    if adapter_dir:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    text = chat_prompt(tokenizer, prompt) if chat else prompt
    inputs = tokenizer(text, return_tensors="pt").to(device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    worker = threading.Thread(target=model.generate, daemon=True,
                              kwargs=dict(**inputs, streamer=streamer, max_new_tokens=max_new_tokens,
                                          do_sample=False, pad_token_id=tokenizer.eos_token_id))
    worker.start()
    yield from streamer
    worker.join()


def _has_tokenizer(folder: str) -> bool:
    from pathlib import Path

    return (Path(folder) / "tokenizer_config.json").exists()
