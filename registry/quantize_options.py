"""What a quantize request may ask for, and the checks that need neither torch nor the weights.

registry.quantize imports torch (through registry.st); the CLI and the server (submit.py) and the daemon's
pipelines check requests before a job is queued, in processes that should not load it, so these live here.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import BadInput

BITS = (2, 3, 4, 8)
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class QuantizeOptions:
    """How to quantize; everything here is recorded in the artifact's metadata."""

    bits: int = 4
    group_size: int = 128
    desc_act: bool = False
    sym: bool = True
    calibration: str | None = None
    samples: int | None = None  # None: not chosen; up to 128, fewer with a warning when the text is short
    seq_len: int = 512
    device: str = "auto"
    seed: int = 0
    evaluate: bool = True
    max_ppl_ratio: float = 1.5


def check_quantizable(artifact) -> None:
    """Refuse an adapter or an already quantized model (anything with an Artifact's name, kind and meta)."""
    if artifact.kind == "adapter":
        raise BadInput(f"{artifact.name} is an adapter; merge it into its base first (registry merge), "
                       "then quantize the merged model")
    if artifact.kind == "quantized" or "quantization_config" in (artifact.meta or {}):
        raise BadInput(f"{artifact.name} is already quantized; quantize its full-precision source instead")


def check_options(opts: QuantizeOptions) -> None:
    """Refuse options no model could take (whether a group size divides the layers needs the weights)."""
    if opts.bits not in BITS:
        raise BadInput(f"--bits {opts.bits} is not supported; use one of {', '.join(map(str, BITS))}")
    if opts.group_size < 1 and opts.group_size != -1:
        raise BadInput(f"--group-size {opts.group_size} is not valid; use a positive divisor of the layers' input "
                       "features (e.g. 32, 64, 128) or -1 for none")
    if (opts.samples is not None and opts.samples < 1) or opts.seq_len < 8:
        raise BadInput("--samples must be at least 1 and --seq-len at least 8")
    if opts.device not in DEVICES:
        raise BadInput(f"unknown device {opts.device!r}; use auto, cpu or cuda")
    if not opts.max_ppl_ratio > 0:
        raise BadInput(f"--max-ppl-ratio {opts.max_ppl_ratio} is not valid; give a number above 0")
