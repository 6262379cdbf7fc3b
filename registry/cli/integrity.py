"""Integrity commands: verify (also against the hub with --upstream), repair, fsck, gc."""
from __future__ import annotations

import sys

import click

from .. import remote, render
from ..errors import BadInput
from . import cli
from . import remote as remote_cli
from .common import _fast_read, _reg, _run, _trust_command_line_endpoint, _worker_config, detach_option, json_option


@cli.command()
@click.argument("refs", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Verify every artifact.")
@click.option("--quick", is_flag=True, help="Compare stat stamps only (size, mtime, inode); reads no bytes. "
                                            "Not with --upstream.")
@click.option("--upstream", is_flag=True, help="Compare pulled artifacts with the hub's hashes for their pinned "
                                               "commit, and say whether the branch has moved since.")
@click.option("--endpoint", help="Hub or mirror to ask with --upstream, trusted for this command (default: the "
                                 "one each artifact was pulled from, or HF_ENDPOINT at its --hf-cache import; "
                                 "none recorded: HF_ENDPOINT, else the public hub).")
@click.option("--token-file", type=click.Path(dir_okay=False), help="Token for --upstream, sent only to --endpoint "
              "(without it: only to HF_ENDPOINT, else the public hub; default token: HF_TOKEN or the login store).")
@detach_option
@json_option
def verify(refs: tuple[str, ...], all_: bool, quick: bool, upstream: bool, endpoint: str | None,
           token_file: str | None, detach: bool, as_json: bool) -> None:
    """Re-hash every file of the artifacts against their manifests; exit 1 on any failure.

    \b
    Examples:
      registry verify llama-7b
      registry verify --all --quick
      registry verify --upstream meta-llama/Llama-2-7b-hf
    """
    if not refs and not all_:
        raise BadInput("name at least one artifact to verify, or pass --all")
    if upstream:
        if remote.configured():
            remote_cli.refuse("verify --upstream", "compares a local registry with the hub")
        if quick:  # it would mean nothing new: --upstream never reads the LFS files (the large ones) anyway
            raise BadInput("--quick does not go with --upstream: --upstream compares LFS files by their recorded "
                           "sha256 without reading them and re-hashes only the small git files; drop --quick")
        return _verify_upstream(refs, all_, endpoint, token_file, as_json)
    if endpoint or token_file:
        raise BadInput("--endpoint and --token-file go with --upstream")
    if remote.configured():
        body = {"type": "verify", "refs": list(refs), "all": all_, "quick": quick}
        return _verified(remote_cli.run(body, detach, as_json), as_json)
    # A quick check here on SQLite needs no ORM (fastread.py); it records the same job and events.
    from ..submit import verify_params, verify_request

    job = _fast_read(lambda c: c.verify_quick(refs, all_, verify_params)) if quick and not detach else None
    if job is None:
        req = verify_request(_reg(), refs, all_, quick)  # resolved now: the job names artifacts by id
        job = _run(req.type, req.params, req.dedup_key, detach, as_json)
    _verified(job, as_json)


def _verified(job, as_json: bool) -> None:
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
    from ..upstream import check_all, check_upstream

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
@click.option("--from", "from_dir", metavar="DIR", help="Restore from this folder instead of the source: it holds "
              "the artifact's files at the same relative paths (each is checked against the manifest's sha256).")
@detach_option
@json_option
def repair(ref: str, from_dir: str | None, detach: bool, as_json: bool) -> None:
    """Re-verify an artifact and restore its missing or damaged files from its source.

    A pulled artifact re-downloads them from its endpoint and commit (the endpoint must be trusted: the
    public hub, HF_ENDPOINT or config.toml); an imported one re-reads them from its source folder when they
    still have the content that was imported. With --from DIR, any artifact (merged and quantized ones too)
    takes them from DIR, a copy of its files (a backup, another host's export). A file is replaced only by
    content with the manifest's sha256. Exit 1 when a file cannot be restored.

    \b
    Examples:
      registry verify llama-7b || registry repair llama-7b
      registry repair llama-7b --json
      registry repair llama-7b-chat-int4 --from /backup/llama-7b-chat-int4
    """
    if remote.configured():
        remote_cli.refuse_host_path("--from", from_dir)
        return _repaired(remote_cli.run({"type": "repair", "ref": ref}, detach, as_json), as_json)
    from ..submit import repair_request

    req = repair_request(_reg(), ref, from_dir=from_dir)
    _repaired(_run(req.type, req.params, req.dedup_key, detach, as_json), as_json)


def _repaired(job, as_json: bool) -> None:
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
@click.option("--rebuild-catalog", is_flag=True, help="Rebuild artifacts, files, blobs, tags and lineage into an "
                                                      "empty catalog from the records kept in the store.")
@click.option("--write-records", is_flag=True, help="Write the store records that are missing (catalogs from "
                                                    "before records were kept).")
@json_option
def fsck(rebuild_catalog: bool, write_records: bool, as_json: bool) -> None:
    """Check the catalog against the store (missing blobs, artifacts without records, records without artifacts).

    Exit 1 when they disagree. Every artifact's record is kept in the store, so a lost catalog can be rebuilt:
    point REGISTRY_DATABASE_URL at an empty database (or remove the SQLite file) and run --rebuild-catalog.

    \b
    Examples:
      registry fsck
      registry fsck --write-records
      REGISTRY_DATABASE_URL=postgresql+psycopg://user@db-host/new registry fsck --rebuild-catalog
    """
    from .. import fsck as checks

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


@cli.command()
@click.option("--dry-run", is_flag=True, help="Only report what would be deleted.")
@click.option("--all-temp", is_flag=True, help="Also delete partial pull downloads kept for resuming "
                                               "(default: kept for REGISTRY_PARTIAL_TTL seconds, 24 h).")
@json_option
def gc(dry_run: bool, all_temp: bool, as_json: bool) -> None:
    """Delete blobs no artifact references, stale temporary files and stale snapshots.

    Safe beside running imports, pulls and jobs: blobs they are using are pinned and kept.

    \b
    Examples:
      registry gc --dry-run
      registry gc
      registry gc --all-temp --json
    """
    if remote.configured():
        if dry_run or all_temp:
            remote_cli.refuse(f"gc {'--dry-run' if dry_run else '--all-temp'}", "is not offered by a catalog server")
        job = remote_cli.run({}, False, as_json, path="/v1/gc")  # an admin token; a worker of the server runs it
        if as_json:
            return render.emit_json({"job": job.id, **job.result})
        # The job lists at most 100 names of each; its counts are complete.
        counts = {key: job.result[f"{key}_count"] for key in GC_LISTS}
        return _gc_summary(job.result["bytes_freed"], counts, dry_run, all_temp)
    from ..gc import collect_garbage

    report = collect_garbage(_reg(), dry_run, all_temp=all_temp)
    if as_json:
        render.emit_json(report.to_dict())
        return
    _gc_summary(report.bytes_freed, {key: len(getattr(report, key)) for key in GC_LISTS}, dry_run, all_temp)


GC_LISTS = ("blobs", "temp_files", "snapshots", "partials_kept")  # what gc removed (or kept), by kind


def _gc_summary(bytes_freed: int, counts: dict[str, int], dry_run: bool, all_temp: bool) -> None:
    verb = "would free" if dry_run else "freed"
    click.echo(f"{verb} {render.human_size(bytes_freed)} ({bytes_freed} bytes): {counts['blobs']} blobs, "
               f"{counts['temp_files']} temporary files, {counts['snapshots']} snapshots")
    if counts["partials_kept"] and not all_temp:
        click.echo(f"kept {counts['partials_kept']} partial downloads for resuming a pull; "
                   "registry gc --all-temp deletes them")
