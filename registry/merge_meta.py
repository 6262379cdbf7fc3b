"""What a merge records about itself, and the optional --check against peft."""
from __future__ import annotations

import importlib.metadata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # registry.lora imports torch; convert (registry.gguf) takes package_version from here without it
    from .core import Registry
    from .lora import AdapterPlan
    from .store import Ingested

CHECK_PROMPT = "<s>Human: What is a model registry?\n</s><s>Assistant: "


def package_version(package: str) -> str | None:
    """The installed version of a package, or None."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def merge_metadata(base_meta: dict[str, Any], plan: AdapterPlan, base_digest: str, adapter_digest: str,
                   out_dtype: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metadata, provenance): the base's metadata (what the files say), and exactly what was fused with
    what, by which versions (how they were made; kept out of the digest)."""
    from .merge import CONFIG_DTYPES

    cfg = plan.config
    scalings = sorted({m.scaling for m in plan.modules.values()})
    meta = {k: v for k, v in base_meta.items() if k not in ("peft_config", "unsafe_files")}
    if out_dtype:
        meta["dtype"] = CONFIG_DTYPES[out_dtype]
    merge = {
        "base_digest": base_digest, "adapter_digest": adapter_digest,
        "r": cfg.get("r"), "lora_alpha": cfg.get("lora_alpha"),
        "scaling": scalings[0] if len(scalings) == 1 else {m.module: m.scaling for m in plan.modules.values()},
        "use_rslora": bool(cfg.get("use_rslora")), "use_dora": bool(cfg.get("use_dora")),
        "rank_pattern": cfg.get("rank_pattern") or {}, "alpha_pattern": cfg.get("alpha_pattern") or {},
        "target_modules": cfg.get("target_modules"), "modules_to_save": cfg.get("modules_to_save"),
        "fan_in_fan_out": bool(cfg.get("fan_in_fan_out")),
        "tensors_merged": len(plan.modules), "tensors_replaced": len(plan.replacements),
        "versions": {p: package_version(p) for p in ("registry", "torch", "safetensors", "peft")},
    }
    return meta, {"merge": merge}


def check_logits(reg: Registry, base_ref: str | int, adapter_ref: str | int, merged: dict[str, Ingested],
                 out_dtype: str | None) -> dict[str, Any]:
    """Run one prompt through base+adapter (peft) and through the merged files; the largest logit gap."""
    from .progress import engine_output

    with engine_output():  # peft imports GPTQModel when it is installed, which talks on stdout
        return _check_logits(reg, base_ref, adapter_ref, merged)


def _check_logits(reg: Registry, base_ref: str | int, adapter_ref: str | int,
                  merged: dict[str, Ingested]) -> dict[str, Any]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    from .export import snapshot_path

    base_dir, adapter_dir = snapshot_path(reg, base_ref), snapshot_path(reg, adapter_ref)
    with reg.store.scratch_dir("merge-check") as scratch:  # locked: gc leaves it alone while we use it
        tmp = scratch / "merged"
        for rel, ingested in merged.items():
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            reg.store.materialize(ingested.sha256, dest, "link")
        merged_model = AutoModelForCausalLM.from_pretrained(tmp)
        dtype = merged_model.dtype
        reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype),
                                              adapter_dir)
        try:
            ids = AutoTokenizer.from_pretrained(base_dir)(CHECK_PROMPT, return_tensors="pt").input_ids
        except (OSError, ValueError):
            ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
        with torch.no_grad():
            diff = (merged_model(ids).logits.float() - reference(ids).logits.float()).abs().max().item()
    return {"max_logit_diff": diff, "prompt_tokens": int(ids.shape[1]), "dtype": str(dtype).replace("torch.", "")}
