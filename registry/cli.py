"""The `registry` command: a thin click layer that parses, calls one library function and renders."""
from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from pathlib import Path

import click

from . import catalog, jobs, render
from .core import Registry
from .errors import EXIT_USAGE, BadInput, RegistryError, error_for
from .manifest import canonical_json, sha256sum_lines
from .models import JOB_STATES, KINDS
from .progress import terminal_reporter

json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
detach_option = click.option("--detach", is_flag=True, help="Queue the job for a worker and return at once.")
_debug = False  # set by `registry --debug`; main() then prints the traceback of an unexpected error


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", type=click.Path(file_okay=False), envvar="REGISTRY_HOME",
              help="Registry home folder (env REGISTRY_HOME; default: per-user data folder).")
@click.option("--database-url", envvar="REGISTRY_DATABASE_URL",
              help="SQLAlchemy URL of the catalog (env REGISTRY_DATABASE_URL; default: SQLite in the home).")
@click.option("--debug", is_flag=True, envvar="REGISTRY_DEBUG",
              help="Log at DEBUG level and print the traceback of an unexpected error (env REGISTRY_DEBUG=1).")
@click.version_option(package_name="registry")
@click.pass_context
def cli(ctx: click.Context, home: str | None, database_url: str | None, debug: bool) -> None:
    """A registry for LLM weights: SHA-256 manifests, lineage, verification and jobs.

    Exit codes: 0 ok, 1 operation failed, 2 usage or bad input, 3 not found.
    """
    global _debug
    _debug = debug
    if debug:
        logging.basicConfig(level=logging.DEBUG, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    ctx.obj = Registry(home, database_url)


def _reg() -> Registry:
    return click.get_current_context().obj


def _run(job_type: str, params: dict, dedup_key: str, detach: bool, as_json: bool):
    """Run a job here (or attach to the identical one) and raise its error if it failed."""
    from .workers import run_or_attach

    reporter = None if as_json else terminal_reporter()
    job = run_or_attach(_reg(), job_type, params, dedup_key, reporter, detach)
    if detach:
        data = {"job": job.id, "state": job.state}
        render.emit_json(data) if as_json else click.echo(f"queued job {job.id}; watch it with: registry job {job.id}")
        return None
    if job.state != "succeeded" and not (job.result and job.exit_code == 1):
        raise error_for(job.exit_code, job.error or job.message or f"job {job.id} {job.state}")
    return job


def _result(job, as_json: bool) -> dict | None:
    """Print a finished job's warnings, and its JSON when asked; returns the result for text output."""
    if job is None:
        return None
    for warning in job.result.get("warnings", []):
        click.echo(f"warning: {warning}", err=True)
    if as_json:
        render.emit_json({"job": job.id, **job.result})
        return None
    return job.result


@cli.command()
@click.option("--home", type=click.Path(file_okay=False), help="Create the registry here instead.")
@json_option
def init(home: str | None, as_json: bool) -> None:
    """Create the home folder and migrate the catalog database to the newest schema."""
    database_url = click.get_current_context().find_root().params["database_url"]
    reg = Registry(home, database_url) if home else _reg()
    reg.init()
    info = {"home": str(reg.home), "database_url": _safe_url(reg.settings.database_url)}
    render.emit_json(info) if as_json else click.echo(f"registry ready at {info['home']} ({info['database_url']})")


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@cli.command("import")
@click.argument("folder", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", help="Artifact name (required for a folder; default for --hf-cache: the repo id).")
@click.option("--kind", type=click.Choice(KINDS), help="Override the detected kind.")
@click.option("--base", help="Ref of the base model an adapter was trained on.")
@click.option("--link", is_flag=True, help="Hardlink files into the store instead of copying (same file system; "
                                           "the source files become read-only).")
@click.option("--hf-cache", "hf_cache", metavar="REPO_ID", help="Import a snapshot from a Hugging Face cache.")
@click.option("--revision", default="main", show_default=True, help="Branch, tag or commit with --hf-cache.")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Hugging Face cache folder (default: HF_HUB_CACHE).")
@detach_option
@json_option
def import_(folder, name, kind, base, link, hf_cache, revision, cache_dir, detach, as_json) -> None:
    """Register a local Hugging Face style model folder (or a cached snapshot).

    \b
    registry import ./llama-7b --name llama-7b
    registry import ./my-lora --name my-lora --base llama-7b
    registry import --hf-cache meta-llama/Llama-2-7b-hf
    """
    if hf_cache:
        if folder is not None:
            raise BadInput("give either a FOLDER or --hf-cache REPO_ID, not both")
        params = {"hf_cache_repo": hf_cache, "revision": revision, "name": name,
                  "cache_dir": cache_dir and str(Path(cache_dir).absolute())}
    else:
        if folder is None or not name:
            raise BadInput("usage: registry import FOLDER --name NAME (or --hf-cache REPO_ID)")
        params = {"folder": str(folder.absolute()), "name": name}
    params.update(kind=kind, base=base, link=link)
    key = "import:" + "|".join(f"{k}={params[k]}" for k in sorted(params))
    r = _result(_run("import", params, key, detach, as_json), as_json)
    if r is not None:
        verb = "registered" if r["created"] else "already registered"
        click.echo(f"{verb} {r['name']} ({r['kind']}) {r['digest']}: {r['files']} files, "
                   f"{render.human_size(r['size'])}, {render.human_size(r['bytes_added'])} added to the store")


@cli.command()
@click.argument("repo")
@click.option("--include", multiple=True, metavar="GLOB", help="Only files matching (repeatable).")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Skip files matching (repeatable).")
@click.option("--endpoint", help="Hub or mirror URL (default: HF_ENDPOINT, else the public hub).")
@click.option("--token-file", type=click.Path(dir_okay=False), help="File holding the access token for this "
              "command (default: HF_TOKEN, else the huggingface_hub login; a worker uses its config.toml).")
@click.option("--name", help="Artifact name (default: the repo id).")
@click.option("--kind", type=click.Choice(KINDS), help="Override the detected kind.")
@click.option("--workers", default=8, show_default=True, type=click.IntRange(1, 64), help="Parallel downloads.")
@detach_option
@json_option
def pull(repo, include, exclude, endpoint, token_file, name, kind, workers, detach, as_json) -> None:
    """Download REPO_ID[@REVISION] from the hub, verifying every file as it arrives.

    \b
    registry pull meta-llama/Llama-2-7b-hf
    registry pull org/model@v1.0 --include '*.safetensors' --include '*.json'
    HF_ENDPOINT=https://mirror.example registry pull org/model
    """
    from . import hub
    from .pull import pull_offline

    repo_id, revision = hub.parse_repo_ref(repo)
    if hub.offline():
        found = pull_offline(_reg(), repo_id, revision)
        render.emit_json(found) if as_json else click.echo(
            f"offline: {repo_id}@{revision} is already registered as {found['name']} {found['digest']}")
        return
    endpoint = _trust_command_line_endpoint(endpoint, token_file)
    if detach and token_file:
        click.echo("warning: --token-file is used by this command only; the worker that runs the job uses the "
                   "token its own config.toml gives this endpoint", err=True)
    commit = hub.resolve_commit(endpoint, repo_id, revision, hub.token_for(_worker_config(), endpoint))
    # No token and no token file in params: anyone who can queue a job can read (and write) them.
    params = {"repo_id": repo_id, "revision": revision, "commit": commit, "endpoint": endpoint,
              "include": sorted(include), "exclude": sorted(exclude), "name": name, "kind": kind,
              "workers": workers}
    key = "pull:" + "|".join(str(params[k]) for k in ("endpoint", "repo_id", "commit", "include", "exclude",
                                                       "name", "kind"))
    r = _result(_run("pull", params, key, detach, as_json), as_json)
    if r is not None:
        click.echo(f"pulled {r['repo_id']}@{r['commit'][:12]} as {r['name']} ({r['kind']}) {r['digest']}: "
                   f"{r['files']} files, {render.human_size(r['size'])}; downloaded {r['files_downloaded']} files "
                   f"({render.human_size(r['bytes_downloaded'])}), the rest was already in the store; "
                   f"tagged {r['tag']}")


def _worker_config():
    from .config import load_worker_config

    return load_worker_config(_reg().home)


def _trust_command_line_endpoint(endpoint: str | None, token_file: str | None) -> str:
    """The endpoint to use; one the user typed (or gave a token for) is trusted for jobs run in this process."""
    from . import hub

    url = hub.endpoint_url(endpoint)
    if endpoint or token_file:
        hub.trust_for_session(url, hub.read_token(token_file) if token_file else None)
    return url


@cli.command()
@click.argument("base")
@click.argument("adapter")
@click.option("--name", help="Name of the merged artifact (default: ADAPTER-merged).")
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto", show_default=True,
              help="Output dtype of float tensors (auto keeps the base's).")
@click.option("--check", is_flag=True, help="Also run one prompt through peft (base + adapter) and the merged "
                                            "model, and record the largest logit difference.")
@click.option("--force", is_flag=True, help="Merge even though the adapter names another base model.")
@click.option("--allow-pickle", is_flag=True, help="Accept an adapter_model.bin (loaded with weights_only=True).")
@detach_option
@json_option
def merge(base, adapter, name, dtype, check, force, allow_pickle, detach, as_json) -> None:
    """Fuse a LoRA ADAPTER into its BASE, tensor by tensor, exactly as peft's merge_and_unload.

    \b
    registry merge llama-7b my-lora --name llama-7b-chat
    registry merge llama-7b my-lora --dtype bf16 --check
    """
    with _reg().session() as s:  # resolve once: the job names these artifacts by id, not a movable tag or digest
        base_id, adapter_id = (catalog.require_usable(catalog.resolve(s, ref)).id for ref in (base, adapter))
    params = {"base_id": base_id, "adapter_id": adapter_id, "name": name, "dtype": dtype, "check": check,
              "force": force, "allow_pickle": allow_pickle}
    key = "merge:" + "|".join(str(params[k]) for k in sorted(params))
    r = _result(_run("merge", params, key, detach, as_json), as_json)
    if r is None:
        return
    click.echo(f"merged {adapter} into {base}: {r['name']} {r['digest']} ({r['tensors_merged']} tensors merged, "
               f"{r['tensors_replaced']} replaced, {render.human_size(r['bytes_added'])} added to the store)")
    if r["check"]:
        click.echo(f"check: largest logit difference against peft {r['check']['max_logit_diff']:.3g}")


@cli.command()
@click.argument("ref")
@click.option("--bits", default=4, show_default=True, type=int, help="Bits per weight: 2, 3, 4 or 8.")
@click.option("--group-size", default=128, show_default=True, type=int, help="Columns per quantization group (-1: none).")
@click.option("--desc-act/--no-desc-act", default=False, show_default=True, help="Quantize columns by activation order.")
@click.option("--sym/--no-sym", default=True, show_default=True, help="Symmetric quantization.")
@click.option("--calibration", type=click.Path(dir_okay=False), help=".txt (a sample per paragraph) or .jsonl "
              "(text, or conversations); default: a built-in text.")
@click.option("--samples", default=128, show_default=True, type=int, help="Calibration samples to use.")
@click.option("--seq-len", default=512, show_default=True, type=int, help="Tokens per calibration sample at most.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for sampling and the engine.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--no-eval", is_flag=True, help="Skip the perplexity evaluation.")
@click.option("--max-ppl-ratio", default=1.5, show_default=True, type=float,
              help="Fail when quantized perplexity exceeds this multiple of the source's.")
@click.option("--name", help="Artifact name (default: REF-gptq-intN).")
@detach_option
@json_option
def quantize(ref, bits, group_size, desc_act, sym, calibration, samples, seq_len, seed, device, no_eval,
             max_ppl_ratio, name, detach, as_json) -> None:
    """Quantize a base or merged model to int4 (GPTQ, with GPTQModel) and evaluate it.

    \b
    registry quantize llama-7b-chat --bits 4 --group-size 128
    registry quantize llama-7b-chat --calibration chats.jsonl --samples 256 --device cuda
    """
    with _reg().session() as s:  # resolve once: the job names this artifact by id, not a movable tag or digest
        source_id = catalog.require_usable(catalog.resolve(s, ref)).id
    options = {"bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": sym, "samples": samples,
               "calibration": calibration and str(Path(calibration).absolute()), "seq_len": seq_len,
               "device": device, "seed": seed, "evaluate": not no_eval, "max_ppl_ratio": max_ppl_ratio}
    params = {"source_id": source_id, "name": name, "options": options}
    r = _result(_run("quantize", params, "quantize:" + json.dumps(params, sort_keys=True), detach, as_json), as_json)
    if r is None:
        return
    click.echo(f"quantized {ref} into {r['name']} {r['digest']}: {render.human_size(r['size'])}")
    if r["evaluation"]:
        e = r["evaluation"]
        click.echo(f"perplexity {e['perplexity_quantized']} vs {e['perplexity_source']} for the source "
                   f"({e['perplexity_ratio']}x); weights {e['size_reduction'] * 100:.0f}% smaller")


@cli.command()
@click.argument("ref")
@click.option("--prompt", required=True, help="Text to continue (or, with --chat, to answer).")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the chat template (or <s>Human: ...</s><s>Assistant: ).")
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(1, 8192))
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
def generate(ref, prompt, chat, max_new_tokens, device) -> None:
    """Generate text with a registered model, streaming tokens to stdout as they are produced."""
    from .ml import require_ml

    require_ml("generate")
    from .generate import generate as run_generate

    for piece in run_generate(_reg(), ref, prompt, chat, max_new_tokens, device):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


@cli.command("list")
@click.option("--kind", type=click.Choice(KINDS), help="Only artifacts of this kind.")
@click.option("--deleted", is_flag=True, help="Include deleted artifacts.")
@json_option
def list_(kind: str | None, deleted: bool, as_json: bool) -> None:
    """List registered artifacts, newest first."""
    with _reg().read_session() as s:
        items = [catalog.summary(s, a) for a in catalog.list_artifacts(s, kind, deleted)]
    render.emit_json(items) if as_json else render.artifact_list(items)


@cli.command()
@click.argument("ref")
@json_option
def show(ref: str, as_json: bool) -> None:
    """Show an artifact: metadata, files, lineage up and down, jobs and events.

    REF is a name, a tag, or a digest prefix such as sha256:1a2b3c4d.
    """
    with _reg().session() as s:
        data = catalog.details(s, catalog.resolve(s, ref))
    render.emit_json(data) if as_json else render.artifact_details(data)


@cli.command()
@click.argument("refs", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Verify every artifact.")
@click.option("--quick", is_flag=True, help="Compare stat stamps only (size, mtime, inode); reads no bytes.")
@click.option("--upstream", is_flag=True, help="Compare pulled artifacts with the hub's hashes for their pinned "
                                               "commit, and say whether the branch has moved since.")
@click.option("--endpoint", help="Hub or mirror to ask with --upstream, trusted for this command (default: the "
                                 "one each artifact was pulled from).")
@click.option("--token-file", type=click.Path(dir_okay=False), help="Token for --upstream, sent to --endpoint "
              "(default: HF_ENDPOINT, else the public hub) only (default token: HF_TOKEN).")
@detach_option
@json_option
def verify(refs: tuple[str, ...], all_: bool, quick: bool, upstream: bool, endpoint: str | None,
           token_file: str | None, detach: bool, as_json: bool) -> None:
    """Re-hash every file of the artifacts against their manifests; exit 1 on any failure."""
    if not refs and not all_:
        raise BadInput("name at least one artifact to verify, or pass --all")
    if upstream:
        return _verify_upstream(refs, all_, endpoint, token_file, as_json)
    if endpoint or token_file:
        raise BadInput("--endpoint and --token-file go with --upstream")
    with _reg().session() as s:  # resolve once: the job names these artifacts by id, not a movable tag or digest
        ids = sorted({catalog.resolve(s, r).id for r in refs})
    params = {"artifact_ids": ids, "all": all_, "quick": quick}
    job = _run("verify", params, f"verify:{'all' if all_ else ','.join(map(str, ids))}:{quick}", detach, as_json)
    if job is None:
        return
    reports = job.result["artifacts"]
    render.emit_json({"job": job.id, "ok": job.state == "succeeded", "artifacts": reports}) if as_json \
        else render.verify_reports(reports)
    if job.state != "succeeded":
        sys.exit(job.exit_code or 1)


def _verify_upstream(refs: tuple[str, ...], all_: bool, endpoint: str | None, token_file: str | None,
                     as_json: bool) -> None:
    """Compare with the hub. A stored endpoint gets a token only when this host trusts it (config.toml, the
    public hub, HF_ENDPOINT) or the user names it here with --endpoint."""
    from .upstream import check_all, check_upstream

    if refs and all_:
        raise BadInput("give artifact names or --all, not both")
    url = _trust_command_line_endpoint(endpoint, token_file) if endpoint or token_file else None
    config = _worker_config()
    if all_:
        checks = check_all(_reg(), endpoint and url, config)
    else:
        checks = [check_upstream(_reg(), ref, endpoint and url, config) for ref in refs]
    if as_json:
        render.emit_json([c.to_dict() for c in checks])
    else:
        for c in checks:
            if c.skipped or c.error:
                click.echo(f"{c.name}: {'skipped, ' + c.skipped if c.skipped else 'ERROR ' + c.error}")
        render.upstream_reports([c for c in checks if c.status in ("ok", "differs")])
        if all_:
            counts = {st: sum(c.status == st for c in checks) for st in ("ok", "differs", "error", "skipped")}
            click.echo(f"{len(checks)} artifacts: " + ", ".join(f"{n} {st}" for st, n in counts.items()))
    if any(c.status in ("differs", "error") for c in checks):
        sys.exit(1)


@cli.command()
@click.argument("ref")
@detach_option
@json_option
def repair(ref: str, detach: bool, as_json: bool) -> None:
    """Re-verify an artifact and restore its missing or damaged files from its source.

    A pulled artifact re-downloads them from its endpoint and commit (the endpoint must be trusted: the
    public hub, HF_ENDPOINT or config.toml); an imported one re-reads them from its source folder when they
    still have the content that was imported. Exit 1 when a file cannot be restored.
    """
    from .repair import resolve_for_repair

    with _reg().session() as s:  # resolve now: the job names the artifact by id, never by a movable ref
        artifact = resolve_for_repair(s, ref)
        params = {"artifact_id": artifact.id, "name": artifact.name}
    job = _run("repair", params, f"repair:{artifact.id}", detach, as_json)
    if job is None:
        return
    r = job.result
    if as_json:
        render.emit_json({"job": job.id, **r})
    else:
        click.echo(f"{r['name']} {r['digest'][:19]}: {len(r['damaged'])} of {r['files_checked']} files damaged")
        cannot = {u["path"]: u["reason"] for u in r["unrestorable"]}
        for d in r["damaged"]:
            line = f"CANNOT      {d['path']}: {cannot[d['path']]}" if d["path"] in cannot \
                else f"restored    {d['path']} (was {d['status'].replace('_', ' ')})"
            click.echo(f"  {line}")
        click.echo(f"{r['name']} is {r['status']}" + (f"; {r['hint']}" if r["hint"] else ""))
    if job.state != "succeeded":
        click.echo(f"error: {job.error}", err=True)
        sys.exit(job.exit_code or 1)


@cli.command()
@click.argument("ref")
@click.option("--format", "fmt", type=click.Choice(["json", "sha256sum"]), default="json", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print {digest, manifest, metadata, provenance} as JSON.")
def manifest(ref: str, fmt: str, as_json: bool) -> None:
    """Print an artifact's canonical manifest: its kind and files (its digest is the SHA-256 of these bytes).

    `--format sha256sum` prints lines that `sha256sum -c` accepts inside an exported folder. `--json` adds the
    metadata and provenance, which are not part of the digest.
    """
    with _reg().session() as s:
        artifact = catalog.resolve(s, ref)
        data = catalog.artifact_manifest(artifact)
        extra = {"digest": artifact.digest, "metadata": artifact.meta, "provenance": artifact.provenance}
    if as_json:
        render.emit_json({"manifest": data, **extra})
    elif fmt == "sha256sum":
        click.echo(sha256sum_lines(data), nl=False)
    else:
        # No newline in a pipe, so `registry manifest REF | sha256sum` prints the artifact's digest.
        click.echo(canonical_json(data).decode(), nl=sys.stdout.isatty())


@cli.command()
@click.argument("ref")
@click.argument("dest", type=click.Path(path_type=Path))
@click.option("--copy", is_flag=True, help="Write independent, writable files: reflinks where the file system "
                                           "supports them (no extra space), else copies; never hardlinks.")
def export(ref: str, dest: Path, copy: bool) -> None:
    """Write an artifact to a new folder that transformers' from_pretrained loads.

    Each file is a reflink (copy-on-write, on btrfs/xfs) where possible, else a hardlink to the store's
    read-only blob, else a copy.
    """
    from .export import export_artifact

    click.echo(str(export_artifact(_reg(), ref, dest, copy)))


@cli.command()
@click.argument("ref")
def path(ref: str) -> None:
    """Print a stable read-only snapshot folder of an artifact (for from_pretrained)."""
    from .export import snapshot_path

    click.echo(str(snapshot_path(_reg(), ref)))


@cli.command()
@click.argument("ref")
@click.argument("tag")
def tag(ref: str, tag: str) -> None:
    """Point TAG (e.g. llama-7b:prod) at an artifact, moving it if it exists."""
    with _reg().session() as s:
        artifact, previous = catalog.set_tag(s, ref, tag)
    moved = f" (moved from {previous[:19]})" if previous and previous != artifact.digest else ""
    click.echo(f"{tag} -> {artifact.name} {artifact.digest[:19]}{moved}")


@cli.command()
@click.argument("ref")
@click.option("--force", is_flag=True, help="Remove even though other artifacts derive from it.")
def rm(ref: str, force: bool) -> None:
    """Remove an artifact from the catalog; its blobs are freed by `registry gc`."""
    with _reg().session() as s:
        artifact = catalog.remove_artifact(s, ref, force)
    click.echo(f"removed {artifact.name} {artifact.digest[:19]}; run registry gc to free its blobs")


@cli.command()
@click.option("--dry-run", is_flag=True, help="Only report what would be deleted.")
@click.option("--all-temp", is_flag=True, help="Also delete partial pull downloads kept for resuming "
                                               "(default: kept for REGISTRY_PARTIAL_TTL seconds, 24 h).")
@json_option
def gc(dry_run: bool, all_temp: bool, as_json: bool) -> None:
    """Delete blobs no artifact references, stale temporary files and stale snapshots.

    Safe beside running imports, pulls and jobs: blobs they are using are pinned and kept.
    """
    from .gc import collect_garbage

    report = collect_garbage(_reg(), dry_run, all_temp=all_temp)
    if as_json:
        render.emit_json(report.to_dict())
        return
    verb = "would free" if dry_run else "freed"
    click.echo(f"{verb} {render.human_size(report.bytes_freed)} ({report.bytes_freed} bytes): "
               f"{len(report.blobs)} blobs, {len(report.temp_files)} temporary files, "
               f"{len(report.snapshots)} snapshots")
    if report.partials_kept and not all_temp:
        click.echo(f"kept {len(report.partials_kept)} partial downloads for resuming a pull; "
                   "registry gc --all-temp deletes them")


@cli.command()
@click.option("--rebuild-catalog", is_flag=True, help="Rebuild artifacts, files, blobs, tags and lineage into an "
                                                      "empty catalog from the records kept in the store.")
@click.option("--write-records", is_flag=True, help="Write the store records that are missing (catalogs from "
                                                    "before records were kept).")
@json_option
def fsck(rebuild_catalog: bool, write_records: bool, as_json: bool) -> None:
    """Check the catalog against the store (missing blobs, artifacts without records, records without artifacts).

    Exit 1 when they disagree. Every artifact's record is kept in the store, so a lost catalog can be rebuilt:
    point REGISTRY_DATABASE_URL at an empty database (or remove the SQLite file) and run --rebuild-catalog.
    """
    from . import fsck as checks

    reg = _reg()
    reg.check_catalog = False  # this is the command that inspects and rebuilds a lost catalog
    if rebuild_catalog and write_records:
        raise BadInput("give --rebuild-catalog or --write-records, not both")
    if rebuild_catalog:
        rebuilt = checks.rebuild_catalog(reg)
        if as_json:
            render.emit_json(rebuilt.to_dict())
        else:
            click.echo(f"rebuilt {len(rebuilt.artifacts)} artifacts, {rebuilt.edges} lineage edges and {rebuilt.tags} "
                       "tags from the store's records; run registry verify --all to re-hash their blobs")
            for name in rebuilt.incomplete:
                click.echo(f"incomplete: {name} (some of its blobs are not in the store)")
            for name in rebuilt.skipped:
                click.echo(f"skipped: {name} (its record is missing or damaged)")
        if rebuilt.skipped or rebuilt.incomplete:
            sys.exit(1)
        return
    report = checks.check(reg, write_records)
    if as_json:
        render.emit_json(report.to_dict())
    else:
        render.fsck_report(report)
    if not report.ok:
        sys.exit(1)


@cli.command("jobs")
@click.option("--state", type=click.Choice(JOB_STATES), help="Only jobs in this state.")
@click.option("--limit", default=50, show_default=True, help="Show at most this many.")
@json_option
def jobs_(state: str | None, limit: int, as_json: bool) -> None:
    """List jobs, newest first."""
    with _reg().read_session() as s:
        items = [jobs.job_dict(j) for j in jobs.list_jobs(s, state, limit)]
    if as_json:
        render.emit_json(items)
    else:
        render.table([render.job_line(j) for j in items], ["ID", "TYPE", "STATE", "TRIES", "PROGRESS", "MESSAGE"])


@cli.command()
@click.argument("job_id", type=int)
@json_option
def job(job_id: int, as_json: bool) -> None:
    """Show one job: state, attempts, progress, result or error."""
    with _reg().read_session() as s:
        data = jobs.job_dict(jobs.get(s, job_id))
    render.emit_json(data) if as_json else render.job_details(data)


@cli.command()
@click.argument("job_id", type=int)
def cancel(job_id: int) -> None:
    """Cancel a queued job, or ask a running one to stop."""
    with _reg().session() as s:
        j = jobs.cancel(s, job_id)
        state, requested = j.state, j.cancel_requested
    click.echo(f"job {job_id}: {'cancel requested' if state == 'running' and requested else state}")


@cli.command()
@click.option("--once", is_flag=True, help="Exit when no job is left to run.")
@click.option("--lease", default=jobs.DEFAULT_LEASE_SECONDS, show_default=True,
              help="Seconds a claimed job stays ours without a heartbeat.")
@click.option("--poll", default=1.0, show_default=True, help="Seconds between looks at an empty queue.")
@click.option("--grace", default=30.0, show_default=True, type=click.FloatRange(0),
              help="Seconds the current job may take to finish after SIGTERM/SIGINT before it is re-queued.")
def worker(once: bool, lease: float, poll: float, grace: float) -> None:
    """Run one worker: claim queued jobs and run them until stopped.

    SIGTERM or Ctrl-C stops claiming and lets the current job finish (up to --grace seconds); a second one,
    or the grace running out, puts the job back in the queue for another worker and exits with code 130.
    """
    from .errors import WorkerStopped
    from .workers import worker_loop

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    reg = _reg()
    reg.init()
    try:
        ran = worker_loop(reg, lease_seconds=lease, poll_seconds=poll, once=once, grace_seconds=grace)
    except WorkerStopped as exc:
        click.echo(f"{exc}; it is queued again for another worker", err=True)
        sys.exit(130)
    click.echo(f"worker ran {ran} job(s)", err=True)


def main() -> None:
    """Console entry point: every error becomes one `error: ...` line on stderr and a documented exit code."""
    try:
        cli.main(standalone_mode=False)
    except RegistryError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except click.exceptions.NoArgsIsHelpError as exc:  # plain `registry`: the help is the answer
        exc.show()
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        where = f"; see {exc.ctx.command_path} --help" if exc.ctx else ""
        click.echo(f"error: {_one_line(_lower_first(exc.format_message())).rstrip('.')}{where}", err=True)
        sys.exit(EXIT_USAGE)
    except click.ClickException as exc:
        click.echo(f"error: {_one_line(_lower_first(exc.format_message()))}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except BrokenPipeError:
        os._exit(0)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # a bug or an unforeseen condition: one line, the traceback only on request
        message = _one_line(str(exc))
        line = f"error: {type(exc).__name__}{': ' + message if message else ''}"
        if _debug:
            traceback.print_exc()
            click.echo(line, err=True)
        else:
            click.echo(f"{line} (rerun with --debug for the traceback)", err=True)
        sys.exit(1)


def _one_line(message: str) -> str:
    """The first line of a message (database drivers append SQL and links on further lines)."""
    lines = message.strip().splitlines()
    return lines[0] + (" ..." if len(lines) > 1 else "") if lines else ""


def _lower_first(message: str) -> str:
    """click says 'No such option'; every other error line starts in lower case."""
    return message[0].lower() + message[1:] if message[:2].istitle() else message


if __name__ == "__main__":
    main()
