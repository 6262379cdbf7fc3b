"""`registry quantize`: int4 (GPTQ) variants made with GPTQModel, cleaned for reproducibility and evaluated."""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .calibration import Calibration, load_calibration
from .catalog import Registered, check_new_name, load, quantized_name, register_artifact, require_usable
from .core import Registry
from .errors import BadInput, OperationFailed
from .export import snapshot_path
from .importer import ingest_files
from .merge_meta import package_version
from .models import Artifact
from .progress import NullReporter, Reporter, engine_output
from .quantize_options import BITS, DEVICES, QuantizeOptions, check_options, check_quantizable  # noqa: F401
from .st import SafetensorsFile

ENGINE_FILES_TO_DROP = ("quant_log.csv",)


@dataclass
class QuantizeResult(Registered):
    """The quantized artifact and its evaluation."""

    evaluation: dict[str, Any] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)  # this run's; a no-op keeps the first one's
    warnings: list[str] = field(default_factory=list)  # e.g. fewer calibration samples than the default


def require_gptqmodel():
    """Import GPTQModel or say how to install it."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(min(os.cpu_count() or 1, 8)))
    try:
        with engine_output():
            import gptqmodel
    except ImportError:
        raise BadInput("GPTQ quantization needs GPTQModel: pip install 'registry[gptq]' "
                       "(gptqmodel==7.6.0 and optimum)") from None
    return gptqmodel


def resolve_device(device: str) -> str:
    """auto -> cuda when a GPU is there, else cpu; cuda without a GPU is bad input."""
    import torch

    if device not in DEVICES:
        raise BadInput(f"unknown device {device!r}; use auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda but no CUDA GPU is available here; use --device cpu")
    return "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)


def check_architecture(model_type: str | None) -> None:
    """Refuse an architecture GPTQModel has no definition for (needs GPTQModel imported: seconds)."""
    from gptqmodel.models.auto import MODEL_MAP

    if model_type not in MODEL_MAP:
        raise BadInput(f"architecture {model_type!r} is not supported by GPTQModel {package_version('gptqmodel')}")


def check_source(artifact: Artifact, files: dict[str, Path], opts: QuantizeOptions) -> None:
    """Refuse what GPTQ cannot or should not quantize, before any heavy work (the architecture: see
    check_architecture, which needs GPTQModel)."""
    check_quantizable(artifact)
    check_options(opts)
    if opts.group_size != -1:
        for rel, path in files.items():
            if rel.endswith(".safetensors"):
                _check_groups(SafetensorsFile(path, rel), opts.group_size)


def _check_groups(st: SafetensorsFile, group_size: int) -> None:
    for name, info in st.tensors():
        shape = info["shape"]
        if ".layers." in name and name.endswith("proj.weight") and len(shape) == 2 and shape[1] % group_size:
            raise BadInput(f"--group-size {group_size} does not divide the {shape[1]} input features of {name}; "
                           "use a divisor (e.g. 32, 64, 128) or -1")


def _calibration_batches(tokenizer, texts: list[str], seq_len: int) -> list[dict[str, list[int]]]:
    batches = []
    for text in texts:
        enc = tokenizer(text, truncation=True, max_length=seq_len)
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return batches


def _clean_output(folder: Path) -> None:
    """Drop engine logs and machine-specific values, so equal inputs give an equal digest anywhere."""
    for name in ENGINE_FILES_TO_DROP:
        (folder / name).unlink(missing_ok=True)
    for name, key in (("quantize_config.json", None), ("config.json", "quantization_config")):
        path = folder / name
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        section = data.get(key) if key else data
        if isinstance(section, dict) and isinstance(section.get("meta"), dict):
            section["meta"].pop("offload_to_disk_path", None)
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def perplexity(model, tokenizer, texts: list[str], seq_len: int, device: str) -> float:
    """Token-weighted perplexity of `model` on `texts`."""
    import torch

    total_nll, total_tokens = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=seq_len).input_ids.to(device)
            if ids.shape[1] < 2:
                continue
            loss = model(ids, labels=ids).loss.float().item()
            total_nll += loss * (ids.shape[1] - 1)
            total_tokens += ids.shape[1] - 1
    if not total_tokens:
        raise BadInput("the held-out evaluation text has no tokens; give a longer calibration file")
    return math.exp(total_nll / total_tokens)


def _evaluate(source_dir: Path, quant_dir: Path, calib: Calibration, opts: QuantizeOptions, device: str,
              source_size: int, quant_size: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    kwargs = {}
    if os.environ.get("REGISTRY_GPTQ_BACKEND"):  # e.g. gptq_torch where the default kernel cannot build offline
        from transformers import GPTQConfig

        kwargs["quantization_config"] = GPTQConfig(bits=opts.bits, group_size=opts.group_size,
                                                   backend=os.environ["REGISTRY_GPTQ_BACKEND"])
    try:
        quant = AutoModelForCausalLM.from_pretrained(quant_dir, device_map=device, **kwargs)
    except Exception as exc:  # any failure to load is the answer: the artifact is not usable
        raise OperationFailed(f"the quantized model does not load with transformers: {exc}") from None
    ppl_q = perplexity(quant, tokenizer, calib.held_out, opts.seq_len, device)
    del quant
    source = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32).to(device)
    ppl_s = perplexity(source, tokenizer, calib.held_out, opts.seq_len, device)
    ratio = ppl_q / ppl_s
    result = {"perplexity_source": round(ppl_s, 4), "perplexity_quantized": round(ppl_q, 4),
              "perplexity_ratio": round(ratio, 4), "held_out_samples": len(calib.held_out),
              "size_source": source_size, "size_quantized": quant_size,
              "size_reduction": round(1 - quant_size / source_size, 4)}
    if ratio > opts.max_ppl_ratio:
        raise OperationFailed(f"quantized perplexity {ppl_q:.3f} is {ratio:.2f}x the source's {ppl_s:.3f}, above "
                              f"--max-ppl-ratio {opts.max_ppl_ratio}; nothing was registered")
    return result


def quantize(reg: Registry, ref: str | int, opts: QuantizeOptions, name: str | None = None,
             reporter: Reporter | None = None, job_id: int | None = None) -> QuantizeResult:
    """Quantize REF (a ref, or an artifact id as jobs carry it) with GPTQ and register a `quantized` artifact
    with lineage to exactly that artifact, and its evaluation as provenance."""
    reporter = reporter or NullReporter()
    # Bad input is refused before torch and GPTQModel are imported (seconds each): a name that is a tag, an
    # adapter, bad options, an unreadable calibration file; then the device and the architecture.
    with reg.read_session() as s:
        source = require_usable(load(s, ref))
        name = name or quantized_name(source.name, opts.bits)
        check_new_name(s, name)  # registration checks again, and refuses a name other content holds
        files = {f.path: reg.store.path(f.sha256) for f in source.files}
        check_source(source, files, opts)
        source_id, source_name, source_digest = source.id, source.name, source.digest
        source_size = sum(f.size for f in source.files if f.path.endswith(".safetensors"))
        model_type = source.meta.get("model_type")
    calib = load_calibration(opts.calibration, opts.samples, opts.seed)
    device = resolve_device(opts.device)
    require_gptqmodel()
    check_architecture(model_type)
    source_dir = snapshot_path(reg, source_id)
    # A scratch folder in the store's temp area, locked while we run: gc leaves it alone until we exit,
    # and removes what a killed run left behind.
    with reg.store.scratch_dir("quantize") as scratch:
        out_dir = scratch / "out"
        out_dir.mkdir()
        reporter.start(4, "steps", f"quantizing {source_name}")
        with engine_output():
            _run_gptq(source_dir, out_dir, calib, opts, device, reporter)
        reporter.advance(2)
        _clean_output(out_dir)
        quant_size = sum(p.stat().st_size for p in out_dir.glob("*.safetensors"))
        with engine_output():
            evaluation = _evaluate(source_dir, out_dir, calib, opts, device, source_size, quant_size) \
                if opts.evaluate else None
        reporter.advance(1)
        meta, provenance = _metadata(out_dir, source_digest, calib, opts, device, evaluation)
        ingested = ingest_files(reg, {p.name: p for p in sorted(out_dir.iterdir()) if p.is_file()}, False,
                                NullReporter())
        reporter.advance(1)
        reporter.finish()
    with reg.session() as s:
        a, created = register_artifact(
            s, reg.store, name=name, kind="quantized", files=ingested,
            meta=meta, parents=[(load(s, source_id), "base")], provenance=provenance,
            source={"path": f"GPTQ int{opts.bits} of {source_name}"}, job_id=job_id)
        return QuantizeResult(a.id, a.name, a.digest, len(a.files), a.total_size, created, evaluation, provenance,
                              calib.warnings)


def _run_gptq(source_dir: Path, out_dir: Path, calib: Calibration, opts: QuantizeOptions, device: str,
              reporter: Reporter | None = None) -> None:
    import random

    import numpy as np
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig
    from transformers import AutoTokenizer

    from gptqmodel.looper import loop_processor

    # GPTQModel writes a log file under ./logs of whatever folder the user runs in; keep it in our temp
    # folder instead (removed with it). A private attribute: if it goes away, the log lands in ./logs again.
    if hasattr(loop_processor, "_PROJECT_LOG_DIR"):
        loop_processor._PROJECT_LOG_DIR = out_dir / ".engine-logs"
    random.seed(opts.seed)
    np.random.seed(opts.seed)
    torch.manual_seed(opts.seed)
    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    config = QuantizeConfig(bits=opts.bits, group_size=opts.group_size, desc_act=opts.desc_act, sym=opts.sym)
    model = GPTQModel.load(str(source_dir), config, device=device)
    from .stopping import stop_forward_when_stopped

    with stop_forward_when_stopped(model.model, reporter):  # `registry cancel` acts within about a layer
        model.quantize(_calibration_batches(tokenizer, calib.samples, opts.seq_len), batch_size=1)
    model.save(str(out_dir))
    for extra in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
        if (source_dir / extra).exists() and not (out_dir / extra).exists():
            shutil.copyfile(source_dir / extra, out_dir / extra)


def _metadata(out_dir: Path, source_digest: str, calib: Calibration, opts: QuantizeOptions, device: str,
              evaluation: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metadata read from the files, provenance: options, device, seed, calibration, versions, evaluation)."""
    from .folder import read_metadata

    meta = read_metadata({p.name: p for p in out_dir.iterdir() if p.is_file()})
    meta.pop("parameter_count", None)  # packed int32 counts would mislead
    qcfg = json.loads((out_dir / "quantize_config.json").read_text())
    meta["quantization_config"] = qcfg
    provenance: dict[str, Any] = {"quantization": {
        "method": "gptq", "source_digest": source_digest, "bits": opts.bits, "group_size": opts.group_size,
        "desc_act": opts.desc_act, "sym": opts.sym, "seed": opts.seed, "device": device,
        "calibration": {"digest": calib.digest, "source": calib.source, "samples": len(calib.samples),
                        "seq_len": opts.seq_len, "held_out": len(calib.held_out)},
        "versions": {p: package_version(p) for p in ("gptqmodel", "torch", "transformers", "optimum", "registry")},
    }}
    if evaluation is not None:
        provenance["evaluation"] = evaluation
    return meta, provenance
