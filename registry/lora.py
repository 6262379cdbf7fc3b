"""Reading a peft LoRA adapter into per-tensor merge instructions, with every check peft would need."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import BadInput
from .st import SafetensorsFile, TensorRef

PREFIX = "base_model.model."
# Config keys that change what a merge means; any of them set is refused rather than silently ignored.
UNSUPPORTED_OPTIONS = ("lora_bias", "layer_replication", "target_parameters", "trainable_token_indices",
                       "use_qalora", "alora_invocation_tokens", "use_bdlora", "arrow_config", "megatron_config")
SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_embedding_A": "embA",
            ".lora_embedding_B": "embB", ".lora_magnitude_vector": "magnitude", ".base_layer.weight": "base"}


@dataclass
class LoraModule:
    """The LoRA tensors for one module, and how to fold them into `<module>.weight`."""

    module: str
    tensors: dict[str, TensorRef] = field(default_factory=dict)
    r: int = 0
    alpha: float = 0.0
    scaling: float = 0.0

    @property
    def is_embedding(self) -> bool:
        return "embA" in self.tensors

    @property
    def target(self) -> str:
        return f"{self.module}.weight"


@dataclass
class AdapterPlan:
    """Everything a merge changes: LoRA modules by target tensor, and tensors replaced outright."""

    config: dict[str, Any]
    modules: dict[str, LoraModule]
    replacements: dict[str, TensorRef]

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out"))


def load_adapter_tensors(files: dict[str, Path], allow_pickle: bool) -> dict[str, TensorRef]:
    """adapter_model.safetensors (read lazily, module by module), or adapter_model.bin with allow_pickle."""
    if "adapter_model.safetensors" in files:
        st = SafetensorsFile(files["adapter_model.safetensors"], "adapter_model.safetensors")
        return {name: TensorRef(st, name) for name, _ in st.tensors()}
    if "adapter_model.bin" in files:
        if not allow_pickle:
            raise BadInput("the adapter is only in adapter_model.bin (pickle); pass --allow-pickle to load it "
                           "with torch.load(weights_only=True), or convert it to safetensors")
        loaded = torch.load(files["adapter_model.bin"], map_location="cpu", weights_only=True)
        return {name: TensorRef(t) for name, t in loaded.items()}
    raise BadInput("the adapter has no adapter_model.safetensors (or adapter_model.bin)")


def check_config(config: dict[str, Any]) -> None:
    """Refuse adapters that are not plain LoRA as peft merges it."""
    method = config.get("peft_type")
    if method != "LORA":
        raise BadInput(f"peft method {method!r} is not supported; only LoRA adapters can be merged")
    for key in UNSUPPORTED_OPTIONS:
        if config.get(key) not in (None, False, {}, [], ""):
            raise BadInput(f"the adapter uses {key}={config[key]!r}, which registry merge does not support")


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's rank_pattern/alpha_pattern lookup: the first key matching the end of the module name."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def plan_adapter(config: dict[str, Any], tensors: dict[str, TensorRef]) -> AdapterPlan:
    """Group adapter tensors by module and compute each module's scaling; refuse unknown keys."""
    check_config(config)
    modules: dict[str, LoraModule] = {}
    replacements: dict[str, torch.Tensor] = {}
    saved = set(config.get("modules_to_save") or [])
    for key, tensor in tensors.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        suffix = next((s for s in SUFFIXES if name.endswith(s)), None)
        if suffix is not None:
            module = name[: -len(suffix)]
            modules.setdefault(module, LoraModule(module)).tensors[SUFFIXES[suffix]] = tensor
        elif name.endswith(".weight") and _saved_module(name[: -len(".weight")], saved):
            replacements[name] = tensor  # modules_to_save: the trained copy replaces the base tensor
        else:
            raise BadInput(f"unknown tensor {key!r} in the adapter; refusing to merge rather than skip it")
    for mod in modules.values():
        _complete(mod, config)
    return AdapterPlan(config, {m.target: m for m in modules.values()}, replacements)


def _saved_module(module: str, saved: set[str]) -> bool:
    return any(module == s or module.endswith("." + s) for s in saved)


def _complete(mod: LoraModule, config: dict[str, Any]) -> None:
    t = mod.tensors
    pair = ("embA", "embB") if "embA" in t or "embB" in t else ("A", "B")
    if not all(k in t for k in pair):
        raise BadInput(f"the adapter has only half of the LoRA pair for {mod.module}")
    if mod.is_embedding and "magnitude" in t:
        raise BadInput(f"DoRA on the embedding {mod.module} is not supported")
    if "magnitude" in t and not config.get("use_dora"):
        raise BadInput(f"{mod.module} has a DoRA magnitude vector but use_dora is not set in adapter_config.json")
    mod.r = int(pattern_value(config.get("rank_pattern") or {}, mod.module, config.get("r", 8)))
    mod.alpha = float(pattern_value(config.get("alpha_pattern") or {}, mod.module, config.get("lora_alpha", 8)))
    if t[pair[0]].shape[0] != mod.r:
        raise BadInput(f"{mod.module}: adapter_config.json says r={mod.r} but its lora_A has rank "
                       f"{t[pair[0]].shape[0]}")
    mod.scaling = mod.alpha / math.sqrt(mod.r) if config.get("use_rslora") else mod.alpha / mod.r


def delta_weight(mod: LoraModule, fan_in_fan_out: bool) -> torch.Tensor:
    """scaling * B @ A in float32, laid out like the base weight (as peft's get_delta_weight)."""
    t = mod.tensors
    if mod.is_embedding:
        return (t["embB"].load().float() @ t["embA"].load().float()).T * mod.scaling
    delta = t["B"].load().float() @ t["A"].load().float()
    return (delta.T if fan_in_fan_out else delta) * mod.scaling


def merged_shape(mod: LoraModule, fan_in_fan_out: bool) -> tuple[int, ...]:
    """The shape the LoRA product has, to compare with the base tensor before any work is done."""
    t = mod.tensors
    if mod.is_embedding:
        return (t["embA"].shape[1], t["embB"].shape[0])
    out, inp = t["B"].shape[0], t["A"].shape[1]
    return (inp, out) if fan_in_fan_out else (out, inp)


def merge_weight(weight: torch.Tensor, mod: LoraModule, fan_in_fan_out: bool) -> torch.Tensor:
    """W + delta computed in float32 and cast back to W's dtype; DoRA rescales rows by magnitude / norm."""
    if "base" in mod.tensors:  # the adapter saved its own copy of the base layer (resized embeddings)
        weight = mod.tensors["base"].load().to(weight.dtype)
    merged = delta_weight(mod, fan_in_fan_out).add_(weight)  # in place: one float32 buffer, not two
    if "magnitude" in mod.tensors:
        oriented = merged.T if fan_in_fan_out else merged
        norm = torch.linalg.norm(oriented, dim=1)
        factor = (mod.tensors["magnitude"].load().float() / norm).view(-1, 1)
        merged = (factor.T if fan_in_fan_out else factor) * merged
    return merged.to(weight.dtype)
