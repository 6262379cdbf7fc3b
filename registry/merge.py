"""`registry merge`: fuse a LoRA adapter into its base, streaming shard by shard and tensor by tensor.

Each output shard keeps the input shard's tensors, order and (when the dtype is unchanged) its exact header;
untouched tensors are copied byte for byte, targeted ones are merged one at a time. Output goes straight
into the store through the hash-on-write writer, so peak memory is about one tensor plus the adapter.

torch (and lora.py and st.py, which import it) are imported only after the request passed every check the
catalog alone can decide (check_request): importing torch takes seconds, and a refusal should not.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from .catalog import (Registered, check_new_name, load, merged_name, register_artifact, require_usable, trained_on,
                      wanted_base)
from .core import Registry
from .errors import BadInput, Conflict, OperationFailed
from .models import Artifact
from .progress import NullReporter, Reporter
from .store import CHUNK, Ingested

if TYPE_CHECKING:
    import torch
    from sqlalchemy.orm import Session

    from .lora import AdapterPlan
    from .st import SafetensorsFile

DTYPE_CHOICES = {"auto": None, "bf16": "BF16", "fp16": "F16", "fp32": "F32"}
CONFIG_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
FLOATS = ("F32", "F16", "BF16", "F64")


@dataclass
class MergeResult(Registered):
    """The merged artifact and what the merge did."""

    tensors_merged: int = 0
    tensors_replaced: int = 0
    bytes_added: int = 0
    check: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)  # this run's; a no-op keeps the first one's


def _check_pair(base: Artifact, adapter: Artifact, trained_on_base: bool, force: bool) -> None:
    if adapter.kind != "adapter":
        raise BadInput(f"{adapter.name} is a {adapter.kind}, not an adapter; usage: registry merge BASE ADAPTER")
    if base.kind == "quantized" or "quantization_config" in base.meta:
        raise BadInput(f"{base.name} is quantized; merge into the full-precision base, then quantize the result")
    if base.kind == "adapter":
        raise BadInput(f"{base.name} is an adapter; the first argument must be the base model")
    if not trained_on_base and not force:
        raise Conflict(f"{adapter.name} was trained on {wanted_base(adapter.meta)!r}, not {base.name}; pass --force "
                       f"if they are the same model (or link them: registry link {adapter.name} {base.name})")


def check_request(session: Session, base_ref: str | int, adapter_ref: str | int, name: str | None, dtype: str,
                  force: bool) -> tuple[Artifact, Artifact, str]:
    """Refuse a merge the catalog alone can refuse, without importing torch: an unknown dtype or ref, a corrupt
    input, the wrong kinds, an adapter trained on another base, a name that is a tag, a base with no
    safetensors weights. Returns the base, the adapter and the result's name."""
    if dtype not in DTYPE_CHOICES:
        raise BadInput(f"unknown dtype {dtype!r}; use one of: {', '.join(DTYPE_CHOICES)}")
    base, adapter = require_usable(load(session, base_ref)), require_usable(load(session, adapter_ref))
    _check_pair(base, adapter, trained_on(session, base, adapter), force)  # the base lookup generate uses
    name = name or merged_name(adapter.name)
    check_new_name(session, name)  # a tag: refused now, not after the merge (registration checks again)
    if not any(f.path.endswith(".safetensors") for f in base.files):
        raise BadInput(f"{base.name} has no safetensors weights to merge into")
    return base, adapter, name


def _check_fit(plan: AdapterPlan, shards: list[SafetensorsFile]) -> None:
    """Every targeted tensor exists in the base with the shape the adapter produces (never skipped by --force)."""
    from .lora import merged_shape

    where = {name: info for s in shards for name, info in s.tensors()}
    for target, mod in plan.modules.items():
        if target not in where:
            raise BadInput(f"the adapter targets {target}, which the base does not have")
        want, have = tuple(merged_shape(mod, plan.fan_in_fan_out)), tuple(where[target]["shape"])
        if want != have:
            raise BadInput(f"shape mismatch for {target}: the adapter gives {list(want)}, the base has {list(have)}")
        if where[target]["dtype"] not in FLOATS:
            raise BadInput(f"{target} is {where[target]['dtype']} in the base; LoRA merges need float weights")
        if "magnitude" in mod.tensors and mod.tensors["magnitude"].shape[0] != (have[1] if plan.fan_in_fan_out else have[0]):
            raise BadInput(f"shape mismatch for the DoRA magnitude of {target}")
    for name, tensor in plan.replacements.items():
        if name not in where:
            raise BadInput(f"modules_to_save tensor {name} is not in the base")
        if tuple(tensor.shape) != tuple(where[name]["shape"]):
            raise BadInput(f"shape mismatch for {name}: the adapter saved {list(tensor.shape)}, "
                           f"the base has {where[name]['shape']}")


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    import torch

    return memoryview(t.contiguous().view(torch.uint8).numpy()).cast("B") if t.numel() else memoryview(b"")


def _out_header(shard: SafetensorsFile, out_dtype: str | None) -> tuple[bytes, dict[str, str]]:
    """The output header: the input's own bytes when no dtype changes, else new offsets (8-byte aligned)."""
    import torch

    from .st import ST_TO_TORCH

    dtypes = {n: (out_dtype if out_dtype and i["dtype"] in FLOATS else i["dtype"]) for n, i in shard.tensors()}
    if all(dtypes[n] == i["dtype"] for n, i in shard.tensors()):
        return shard.header_bytes, dtypes
    header: dict[str, Any] = {}
    if "__metadata__" in shard.header:
        header["__metadata__"] = shard.header["__metadata__"]
    offset = 0
    for name, info in shard.tensors():
        size = int(torch.tensor([], dtype=ST_TO_TORCH[dtypes[name]]).element_size())
        n = 1
        for d in info["shape"]:
            n *= d
        header[name] = {"dtype": dtypes[name], "shape": info["shape"], "data_offsets": [offset, offset + n * size]}
        offset += n * size
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8), dtypes


def _write_shard(reg: Registry, shard: SafetensorsFile, plan: AdapterPlan, out_dtype: str | None,
                 reporter: Reporter, stats: dict[str, int]) -> Ingested:
    header, dtypes = _out_header(shard, out_dtype)
    with reg.store.writer() as w, open(shard.path, "rb", buffering=0) as f:
        w.write(struct.pack("<Q", len(header)) + header)
        data_start = w.size
        for name, info in shard.tensors():
            begin, end = info["data_offsets"]
            changed = name in plan.modules or name in plan.replacements
            if not changed and dtypes[name] == info["dtype"]:
                _copy_range(f, shard.data_start + begin, end - begin, w)  # byte for byte, never decoded
            else:
                w.write(_tensor_bytes(_new_tensor(shard, name, plan, dtypes[name], stats)))
            reporter.advance(end - begin)
        stats["tensor_bytes"] += w.size - data_start  # the index's total_size, if it needs rewriting
        return w.finish()


def _new_tensor(shard: SafetensorsFile, name: str, plan: AdapterPlan, dtype: str,
                stats: dict[str, int]) -> torch.Tensor:
    import torch

    from .lora import merge_weight
    from .st import ST_TO_TORCH

    base = shard.read(name).to(ST_TO_TORCH[dtype])
    if name in plan.replacements:
        stats["replaced"] += 1
        return plan.replacements[name].load().to(base.dtype)
    if name not in plan.modules:
        return base
    merged = merge_weight(base, plan.modules[name], plan.fan_in_fan_out)
    if torch.equal(merged, base):
        raise OperationFailed(f"merged model equals its base: {name} did not change (is the adapter's lora_B all "
                              "zeros, i.e. untrained?); nothing was registered")
    stats["merged"] += 1
    return merged


def _copy_range(f: BinaryIO, start: int, length: int, w) -> None:
    f.seek(start)
    while length:
        chunk = f.read(min(CHUNK, length))
        if not chunk:
            raise OperationFailed("a base shard is shorter than its header says; run registry verify on the base")
        w.write(chunk)
        length -= len(chunk)


def _rewritten_json(reg: Registry, path: Path, change) -> Ingested:
    data = json.loads(path.read_text())
    change(data)
    with reg.store.writer() as w:
        w.write((json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
        return w.finish()


def merge(reg: Registry, base_ref: str | int, adapter_ref: str | int, name: str | None = None, dtype: str = "auto",
          check: bool = False, force: bool = False, allow_pickle: bool = False,
          reporter: Reporter | None = None, job_id: int | None = None) -> MergeResult:
    """Merge ADAPTER into BASE (refs, or artifact ids as jobs carry them) and register the result as a `merged`
    artifact with lineage to exactly those two artifacts."""
    reporter = reporter or NullReporter()
    with reg.session() as s:
        base, adapter, name = check_request(s, base_ref, adapter_ref, name, dtype, force)
        base_files = {f.path: (f.sha256, f.size) for f in base.files}
        adapter_files = {f.path: reg.store.path(f.sha256) for f in adapter.files}
        base_id, adapter_id, base_meta = base.id, adapter.id, dict(base.meta)
        base_name, adapter_name, base_digest, adapter_digest = base.name, adapter.name, base.digest, adapter.digest
        config = adapter.meta.get("peft_config") or {}
    out_dtype = DTYPE_CHOICES[dtype]
    # What only the adapter's tensors can tell (its method, keys and shapes) needs torch from here on.
    from .lora import load_adapter_tensors, plan_adapter
    from .merge_meta import check_logits, merge_metadata
    from .st import SafetensorsFile

    plan = plan_adapter(config, load_adapter_tensors(adapter_files, allow_pickle))
    shard_rels = sorted(p for p in base_files if p.endswith(".safetensors"))
    shards = [SafetensorsFile(reg.store.path(base_files[rel][0]), rel) for rel in shard_rels]
    _check_fit(plan, shards)
    reporter.start(sum(base_files[r][1] for r in shard_rels), "B", f"merging {adapter_name}")
    stats = {"merged": 0, "replaced": 0, "tensor_bytes": 0}
    out: dict[str, Ingested] = {rel: _write_shard(reg, sh, plan, out_dtype, reporter, stats)
                                for rel, sh in zip(shard_rels, shards)}
    reporter.finish()
    out.update(_carried_files(reg, base_files, out, out_dtype, stats["tensor_bytes"]))
    meta, provenance = merge_metadata(base_meta, plan, base_digest, adapter_digest, out_dtype)
    check_result = check_logits(reg, base_id, adapter_id, out, out_dtype) if check else None
    if check_result is not None:
        provenance["merge"]["check"] = check_result
    with reg.session() as s:
        parents = [(load(s, base_id), "base"), (load(s, adapter_id), "adapter")]
        a, created = register_artifact(s, reg.store, name=name, kind="merged",
                                       files=out, meta=meta, parents=parents, provenance=provenance,
                                       source={"path": f"merge of {adapter_name} into {base_name}"}, job_id=job_id)
        return MergeResult(a.id, a.name, a.digest, len(a.files), a.total_size, created, stats["merged"],
                           stats["replaced"], sum(i.size for i in out.values() if i.added), check_result,
                           provenance=provenance)


def _carried_files(reg: Registry, base_files: dict[str, tuple[str, int]], done: dict[str, Ingested],
                   out_dtype: str | None, tensor_bytes: int) -> dict[str, Ingested]:
    """config, tokenizer, generation files: the base's blobs (zero new bytes) unless the dtype changed."""
    from .store import StatStamp

    carried: dict[str, Ingested] = {}
    for rel, (sha, size) in base_files.items():
        if rel in done or rel.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl")):
            continue  # pickle weights of the base would be stale next to merged safetensors
        path = reg.store.path(sha)
        if out_dtype and rel == "config.json":
            carried[rel] = _rewritten_json(reg, path, lambda c: _set_config_dtype(c, out_dtype))
        elif out_dtype and rel == "model.safetensors.index.json":
            carried[rel] = _rewritten_json(reg, path, lambda c: c.setdefault("metadata", {}).update(
                total_size=tensor_bytes))
        else:
            carried[rel] = Ingested(sha, size, False, StatStamp.of(path))
    return carried


def _set_config_dtype(config: dict[str, Any], out_dtype: str) -> None:
    for key in ("dtype", "torch_dtype"):
        if key in config or key == "dtype":
            config[key] = CONFIG_DTYPES[out_dtype]
