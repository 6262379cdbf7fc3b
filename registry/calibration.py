"""Calibration text for quantization: .txt paragraphs or .jsonl records, split into calibration and held-out."""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .errors import BadInput

HUMAN = ("human", "user")
ASSISTANT = ("assistant", "gpt", "bot")
DEFAULT_SAMPLES = 128  # when --samples is not given: this many, or all there are (with a warning) when fewer
# ~200 samples written for this project: English and Chinese prose, multi-turn dialogues, code. Enough that
# the default 128 remain after the held-out quarter, with any seed.
BUILTIN = "data/calibration.jsonl"


@dataclass
class Calibration:
    """Samples for calibration, a disjoint held-out slice for evaluation, and where they came from."""

    samples: list[str]
    held_out: list[str]
    digest: str
    source: str
    warnings: list[str] = field(default_factory=list)


def render_conversation(turns: list[dict]) -> str:
    """Turns in the Llama-Chinese format: <s>Human: ...\\n</s><s>Assistant: ...\\n</s>."""
    parts = []
    for turn in turns:
        who = str(turn.get("from") or turn.get("role") or "").lower()
        text = turn.get("value") if "value" in turn else turn.get("content", "")
        label = "Human" if who in HUMAN else "Assistant" if who in ASSISTANT else None
        if label is None:
            raise BadInput(f"unknown speaker {who!r} in a conversation; use human/user or assistant")
        parts.append(f"<s>{label}: {text}\n</s>")
    return "".join(parts)


def _parse(raw: str, suffix: str, name: str) -> list[str]:
    if suffix == ".jsonl":
        texts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise BadInput(f"{name} line {n} is not valid JSON") from None
            if isinstance(record, dict) and isinstance(record.get("text"), str):
                texts.append(record["text"])
            elif isinstance(record, dict) and isinstance(record.get("conversations"), list):
                texts.append(render_conversation(record["conversations"]))
            else:
                raise BadInput(f"{name} line {n} has neither a 'text' field nor a 'conversations' list")
        return [t for t in texts if t.strip()]
    if suffix == ".txt":
        return [p.strip() for p in raw.split("\n\n") if p.strip()]
    raise BadInput(f"calibration file {name} must be .txt (one sample per paragraph) or .jsonl")


def load_calibration(path: str | Path | None, samples: int | None, seed: int,
                     held_out_fraction: float = 0.25) -> Calibration:
    """Read, shuffle with `seed`, and split; refuses empty files and fewer samples than asked.

    `samples` None (not chosen by the user): DEFAULT_SAMPLES, or all there are with a warning when fewer.
    """
    if path is None:
        raw_bytes = resources.files("registry").joinpath(BUILTIN).read_bytes()
        name, suffix = "the built-in calibration set", ".jsonl"
    else:
        path = Path(path)
        try:
            raw_bytes = path.read_bytes()
        except OSError as exc:
            raise BadInput(f"cannot read calibration file {path}: {exc.strerror}") from None
        name, suffix = str(path), path.suffix.lower()
    try:
        texts = _parse(raw_bytes.decode("utf-8"), suffix, name)
    except UnicodeDecodeError:
        raise BadInput(f"calibration file {name} is not UTF-8 text") from None
    if not texts:
        raise BadInput(f"calibration file {name} has no samples")
    random.Random(seed).shuffle(texts)
    n_held = max(1, int(len(texts) * held_out_fraction)) if len(texts) > 1 else 0
    held_out, pool = texts[:n_held], texts[n_held:]
    warnings = []
    if samples is None:
        samples = min(DEFAULT_SAMPLES, len(pool))
        if samples < DEFAULT_SAMPLES:
            warnings.append(f"{name} gives {len(pool)} calibration samples after holding out {n_held} for "
                            f"evaluation, fewer than the default {DEFAULT_SAMPLES}; using those {len(pool)}")
    elif samples > len(pool):
        raise BadInput(f"{name} gives {len(pool)} calibration samples after holding out {n_held} for "
                       f"evaluation, fewer than --samples {samples}; lower --samples or add text")
    return Calibration(pool[:samples], held_out, "sha256:" + hashlib.sha256(raw_bytes).hexdigest(),
                       "builtin" if path is None else Path(path).name, warnings)
