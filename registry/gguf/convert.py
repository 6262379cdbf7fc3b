"""`registry convert REF --to gguf`: a GGUF file made by llama.cpp's own converter (and quantizer, for K-quants),
evaluated against its source, registered as kind `gguf` with a lineage edge to exactly that source."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..calibration import load_calibration
from sqlalchemy import select

from ..catalog import Registered, add_provenance, check_new_name, load, register_artifact, require_usable
from ..core import Registry
from ..errors import BadInput, Conflict
from ..export import snapshot_path
from ..importer import ingest_files
from ..merge_meta import package_version
from ..models import Artifact
from ..progress import NullReporter, Reporter, engine_output
from .options import ConvertOptions, check_convertible, check_options, gguf_filename, gguf_name

# What the source's metadata says about the model that still holds for its GGUF variant.
SOURCE_META_KEPT = ("model_type", "architectures", "parameter_count")


@dataclass
class ConvertResult(Registered):
    """The GGUF artifact, how it was made and its evaluation."""

    outtype: str = "f16"
    evaluation: dict[str, Any] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)  # this run's; a no-op keeps the first one's
    warnings: list[str] = field(default_factory=list)  # a tokenizer override, K-quant fallbacks, an allowed mismatch


@dataclass
class _Source:
    id: int
    name: str
    digest: str
    size: int
    meta: dict[str, Any]
    files: dict[str, Path]


def check_source(reg: Registry, ref: str | int, opts: ConvertOptions, name: str | None) -> _Source:
    """Everything refused before torch, llama.cpp or the converter start: options, the source's kind and status,
    the result's name, config.json and its architecture, and the tokenizer case (registry.gguf.tokenizer)."""
    check_options(opts)
    with reg.read_session() as s:
        source = require_usable(load(s, ref))
        check_convertible(source)
        found = _Source(source.id, source.name, source.digest,
                        sum(f.size for f in source.files if f.path.endswith(".safetensors")), dict(source.meta or {}),
                        {f.path: reg.store.path(f.sha256) for f in source.files})
        _check_result_name(s, name or gguf_name(source.name, opts.outtype), found, opts)
    from .converter import check_architecture

    check_architecture(_config(found))
    return found


def _check_result_name(session, name: str, source: _Source, opts: ConvertOptions) -> None:
    """The result's name is valid, not a tag, and not held by an artifact this request cannot make: another kind,
    or a conversion of other content or with other options (the default name says nothing of --pre-tokenizer),
    found now rather than after minutes of work. The same request again proceeds (its registration is a no-op);
    register_artifact checks once more."""
    check_new_name(session, name)
    holder = session.scalars(select(Artifact).where(Artifact.name == name, Artifact.status != "deleted")).first()
    if holder is None:
        return
    made = (holder.provenance or {}).get("conversion") or {}
    tokenizer = made.get("tokenizer") or {}
    asked = tokenizer.get("pre_tokenizer") if tokenizer.get("requested") else None
    if not (holder.kind == "gguf" and made.get("source_digest") == source.digest
            and made.get("outtype") == opts.outtype and asked == opts.pre_tokenizer):
        raise Conflict(f"name {name!r} is already used by {holder.kind} {holder.digest[:19]}, which this conversion "
                       "would not make; choose another --name")


def _config(source: _Source) -> dict[str, Any]:
    path = source.files.get("config.json")
    if path is None:
        raise BadInput(f"{source.name} has no config.json; llama.cpp's converter needs a transformers model folder")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BadInput(f"{source.name}: config.json does not read as JSON ({exc}); repair or re-import it") from None
    if not isinstance(config, dict):
        raise BadInput(f"{source.name}: config.json is not a JSON object; repair or re-import it")
    return config


def convert(reg: Registry, ref: str | int, opts: ConvertOptions, name: str | None = None,
            reporter: Reporter | None = None, job_id: int | None = None) -> ConvertResult:
    """Convert REF (a ref, or an artifact id as jobs carry it) to one GGUF file and register it as kind `gguf`,
    evaluated (unless opts.evaluate is false) against the source before anything is registered."""
    from .converter import run_converter
    from .inspect import read_gguf
    from .tokenizer import plan_tokenizer
    from .vendor import converter_versions, require_llama_cpp

    reporter = reporter or NullReporter()
    source = check_source(reg, ref, opts, name)
    plan = plan_tokenizer(source.files, opts.pre_tokenizer)
    name = name or gguf_name(source.name, opts.outtype)
    require_llama_cpp(load=False)  # the K-quants and the evaluation need it: say so before minutes of conversion
    source_dir = snapshot_path(reg, source.id)
    if opts.evaluate:
        from .evaluate import load_source_config

        load_source_config(source_dir)  # a source transformers cannot load: say so before converting
    filename = gguf_filename(source.name, opts.outtype)
    # A scratch folder in the store's temp area, locked while we run: gc leaves it alone until we exit, and
    # removes what a killed run left behind; the finished file is hashed into the store from there.
    with reg.store.scratch_dir("convert") as scratch:
        reporter.start(3 if opts.evaluate else 2, "steps", f"converting {source.name} to GGUF {opts.outtype}")
        # general.name is the source's name, never the folder's: the same source gives the same bytes anywhere.
        conversion = run_converter(source_dir, scratch, filename, opts.outtype, source.name, plan, reporter)
        reporter.advance(1)
        gguf_meta = read_gguf(conversion.path)
        warnings = list(conversion.warnings)
        evaluation = None
        if opts.evaluate:
            from .evaluate import evaluate

            texts = load_calibration(None, None, 0).held_out
            with engine_output():
                evaluation, more = evaluate(source_dir, conversion.path, texts, opts, source.size,
                                            conversion.path.stat().st_size, getattr(reporter, "check", None))
            warnings += more
            reporter.advance(1)
        # link=True: the file is ours and on the store's file system, so it becomes the blob without a copy.
        ingested = ingest_files(reg, {filename: conversion.path}, True, NullReporter())
        reporter.advance(1)
        reporter.finish()
    meta = {k: source.meta[k] for k in SOURCE_META_KEPT if k in source.meta}
    meta["gguf"] = {**gguf_meta, "outtype": opts.outtype, "file": filename}
    provenance: dict[str, Any] = {"conversion": {
        "to": "gguf", "outtype": opts.outtype, "source_digest": source.digest, "converter": converter_versions(),
        "tokenizer": conversion.tokenizer, "evaluated": opts.evaluate, "max_ppl_ratio": opts.max_ppl_ratio,
        "allow_tokenizer_mismatch": opts.allow_tokenizer_mismatch,
        "versions": {p: package_version(p) for p in ("llama-cpp-python", "torch", "transformers", "registry")},
        "warnings": warnings,
    }}
    if evaluation is not None:
        provenance["evaluation"] = evaluation
    with reg.session() as s:
        a, created = register_artifact(
            s, reg.store, name=name, kind="gguf", files=ingested, meta=meta,
            parents=[(load(s, source.id), "base")], provenance=provenance,
            source={"path": f"GGUF {opts.outtype} of {source.name}"}, job_id=job_id)
        if not created and evaluation is not None and "evaluation" not in (a.provenance or {}):
            # The same file, registered before without an evaluation (--no-eval): keep this run's.
            add_provenance(s, a, {"evaluation": evaluation, "conversion": {
                **((a.provenance or {}).get("conversion") or {}), "evaluated": True,
                "max_ppl_ratio": opts.max_ppl_ratio, "allow_tokenizer_mismatch": opts.allow_tokenizer_mismatch,
                "warnings": warnings}})
        return ConvertResult(a.id, a.name, a.digest, len(a.files), a.total_size, created, opts.outtype,
                             evaluation, provenance, warnings)
