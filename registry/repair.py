"""`registry repair`: re-verify an artifact, then restore each missing or damaged blob from where it came from.

A pulled artifact re-downloads exactly those files from its recorded endpoint and commit (with the pull
Downloader, checked against the hub's digest and then the manifest's sha256; the endpoint must be trusted,
as for a pull job). An imported one re-reads them from its source folder when they still hash to the
manifest's sha256. With `from_dir` (`registry repair REF --from DIR`) they are read from that folder instead,
at the same relative paths, for any artifact (a merged or quantized one too), again only when they hash to
the manifest's sha256. Nothing else is written: the artifact, its digest and its other blobs stay as they are.
The daemon's scrub queues repair jobs for the artifacts of a damaged blob (scrub.py).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select

from . import hub
from .catalog import record_event, resolve
from .config import WorkerConfig, load_worker_config
from .core import Registry
from .errors import NotFound, RegistryError
from .models import Artifact, Blob, File, utcnow
from .progress import NullReporter, Reporter
from .store import Ingested, hash_file, remove_tree


@dataclass
class RepairResult:
    """What a repair found and did; `unrestorable` lists files (with the reason) it could not restore."""

    artifact_id: int
    name: str
    digest: str
    source: str  # hub, folder, given (--from DIR), or none (made by a job whose inputs are not kept)
    files_checked: int
    damaged: list[dict[str, str]] = field(default_factory=list)  # {path, status: missing|wrong_size|mismatch}
    restored: list[str] = field(default_factory=list)
    unrestorable: list[dict[str, str]] = field(default_factory=list)  # {path, reason}
    status: str = "ready"
    hint: str | None = None

    @property
    def ok(self) -> bool:
        return not self.unrestorable

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


@dataclass
class _Target:
    """The artifact as read in one session: its files and where it came from."""

    id: int
    name: str
    digest: str
    files: list[tuple[str, str, int]]  # (path, sha256, size)
    git_sha1: dict[str, str | None]  # sha256 -> the git blob id recorded at pull time
    repo: str | None
    commit: str | None
    endpoint: str | None
    path: str | None


def repair(reg: Registry, artifact_id: int, reporter: Reporter | None = None,
           job_id: int | None = None, from_dir: str | None = None) -> RepairResult:
    """Re-hash every blob of the artifact and restore the bad ones from its source (or from `from_dir`, a
    folder holding the same files at the same relative paths); records the outcome."""
    reporter = reporter or NullReporter()
    target = _load(reg, artifact_id)
    damaged = _check(reg, target, reporter)  # sha256 -> status
    if from_dir is not None:
        source = "given"
    else:
        source = "hub" if target.endpoint and target.repo and target.commit else "folder" if target.path else "none"
    result = RepairResult(target.id, target.name, target.digest, source, len(target.files))
    result.damaged = [{"path": p, "status": damaged[sha]} for p, sha, _ in target.files if sha in damaged]
    wanted = {sha: [p for p, s, _ in target.files if s == sha] for sha in damaged}
    sizes = {sha: size for _, sha, size in target.files}
    restored: dict[str, Ingested] = {}
    if wanted and source == "hub":
        restored = _from_hub(reg, load_worker_config(reg.home), target, wanted, sizes, result, reporter)
        result.hint = f"pull {target.repo}@{target.commit} again under a new name" if result.unrestorable else None
    elif wanted and source == "given":
        restored = _from_folder(reg, load_worker_config(reg.home), target, wanted, result, Path(from_dir))
        result.hint = (f"{from_dir} does not hold these files with the content the manifest records; put the "
                       "right files there and run registry repair again" if result.unrestorable else None)
    elif wanted and source == "folder":
        restored = _from_folder(reg, load_worker_config(reg.home), target, wanted, result)
        result.hint = (f"the source folder {target.path} no longer holds these files as imported; put them back "
                       "and run registry repair again, or import the folder again under a new name"
                       if result.unrestorable else None)
    elif wanted:
        result.unrestorable = [{"path": p, "reason": "no source to restore it from (made by a merge or quantize "
                                "job)"} for sha in wanted for p in wanted[sha]]
        result.hint = "run the merge or quantize that made it again, under a new name"
    result.restored = sorted(p for sha in restored for p in wanted[sha])
    _record(reg, result, restored, job_id)
    if restored:
        drop_snapshots_of_blobs(reg, restored)
    return result


def resolve_for_repair(session, ref: str) -> Artifact:
    """The live artifact `ref` names; a name that only a removed artifact had gets a clear refusal."""
    try:
        return resolve(session, ref)
    except NotFound:
        removed = session.scalars(select(Artifact).where(Artifact.name == ref, Artifact.status == "deleted")).first()
        if removed is not None:
            raise NotFound(f"{ref} was removed (registry rm) and cannot be repaired; import or pull it again") from None
        raise


def _load(reg: Registry, artifact_id: int) -> _Target:
    with reg.session() as s:
        a = s.get(Artifact, artifact_id)
        if a is None or a.status == "deleted":
            raise NotFound(f"artifact {a.name if a else artifact_id} was removed; a removed artifact cannot be "
                           "repaired: import or pull it again")
        files = [(f.path, f.sha256, f.size) for f in a.files]
        git = dict(s.execute(select(Blob.sha256, Blob.git_sha1).where(Blob.sha256.in_({f[1] for f in files}))).all())
        return _Target(a.id, a.name, a.digest, files, git, a.source_repo, a.source_revision, a.source_endpoint,
                       a.source_path)


def _check(reg: Registry, target: _Target, reporter: Reporter) -> dict[str, str]:
    """sha256 -> missing | wrong_size | mismatch, for each distinct blob that is not intact."""
    sizes = {sha: size for _, sha, size in target.files}
    reporter.start(sum(sizes.values()), "B", f"checking {target.name}")

    def one(sha: str) -> str | None:
        path = reg.store.path(sha)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return "missing"
        if size != sizes[sha]:
            reporter.advance(sizes[sha])
            return "wrong_size"
        return None if hash_file(path, reporter.advance)[0] == sha else "mismatch"

    ordered = sorted(sizes, key=lambda sha: -sizes[sha])  # largest first, so no shard is left alone at the end
    with ThreadPoolExecutor(max(1, min(len(ordered), os.cpu_count() or 1))) as pool:
        outcomes = dict(zip(ordered, pool.map(one, ordered)))
    reporter.finish()
    return {sha: status for sha, status in outcomes.items() if status}


def _from_hub(reg: Registry, config: WorkerConfig, target: _Target, wanted: dict[str, list[str]],
              sizes: dict[str, int], result: RepairResult, reporter: Reporter) -> dict[str, Ingested]:
    from .pull import Downloader

    where = f"{target.repo}@{target.commit[:12]} on {target.endpoint}"
    token = hub.token_for(config, target.endpoint)  # an untrusted recorded endpoint is refused, as for a pull
    remote = {f.path: f for f in hub.list_files(target.endpoint, target.repo, target.commit, token)}
    fetch: dict[str, hub.RemoteFile] = {}
    for sha, paths in wanted.items():
        rf = next((remote[p] for p in paths if p in remote), None)
        known_git = target.git_sha1.get(sha)
        if rf is None:
            reason = f"no longer listed in {where}"
        elif rf.size != sizes[sha] or (rf.sha256 or sha) != sha or (known_git and rf.git_sha1 != known_git):
            reason = f"{where} now serves other content for it than the manifest records"
        else:
            fetch[sha] = rf
            continue
        result.unrestorable += [{"path": p, "reason": reason} for p in paths]
    restored = {}
    downloader = Downloader(reg, target.endpoint, target.repo, target.commit, token, reporter)
    try:
        reporter.start(sum(sizes[sha] for sha in fetch), "B", f"repairing {target.name}")
        for sha, rf in fetch.items():
            try:  # verified, then renamed over the damaged file: it is never missing meanwhile
                got = downloader.fetch(rf, replace=True)
            except RegistryError as exc:
                result.unrestorable += [{"path": p, "reason": str(exc)} for p in wanted[sha]]
                continue
            if got.sha256 != sha:
                result.unrestorable += [{"path": p, "reason": f"downloaded content has sha256 {got.sha256}, the "
                                         f"manifest records {sha}"} for p in wanted[sha]]
                continue
            restored[sha] = got
        reporter.finish()
    finally:
        downloader.close()
    return restored


def _from_folder(reg: Registry, config: WorkerConfig, target: _Target, wanted: dict[str, list[str]],
                 result: RepairResult, given: Path | None = None) -> dict[str, Ingested]:
    """From the artifact's source folder, or from `given` (--from DIR): the file at each path holding the blob."""
    restored = {}
    for sha, paths in wanted.items():
        reasons = []
        for rel in paths:
            candidate = (given or Path(target.path)) / rel
            reason = _restore_one(reg, config, candidate, sha, restored, given is not None)
            if reason is None:
                break
            reasons.append({"path": rel, "reason": reason})
        else:
            result.unrestorable += reasons
    return restored


def _restore_one(reg: Registry, config: WorkerConfig, candidate: Path, sha: str,
                 restored: dict[str, Ingested], given: bool = False) -> str | None:
    """Store `candidate` as blob `sha` if it still has that content; else the reason it cannot be used."""
    try:
        resolved = config.check_path(candidate, "source file")
    except RegistryError as exc:
        return str(exc)
    if not resolved.is_file():
        return f"{candidate} is not in the folder" if given else f"{candidate} no longer exists"
    actual, _ = hash_file(resolved)  # read first: the damaged blob stays unless the source really matches
    if actual != sha:
        if given:
            return f"{candidate} has other content (sha256 {actual}, the manifest records {sha})"
        return f"{candidate} has changed since it was imported (sha256 {actual}, the manifest records {sha})"
    got = reg.store.ingest_file(resolved, replace=True)  # renamed over the damaged file only if it matches
    if got.sha256 != sha:
        return f"{candidate} changed while it was being read; run registry repair again"
    restored[sha] = got
    return None


def drop_snapshots_of_blobs(reg: Registry, shas) -> None:
    """Remove snapshot folders that hold any of these blobs: a snapshot shares the damaged file's inode (or
    copied its bytes), while the restored blob is a new file; the next `registry path` builds a fresh one."""
    with reg.read_session() as s:
        holders = select(File.artifact_id).where(File.sha256.in_(list(shas)))
        digests = set(s.scalars(select(Artifact.digest).where(Artifact.id.in_(holders))))
    for digest in sorted(digests):
        folder = reg.settings.snapshots_dir / digest.split(":", 1)[1]
        if folder.is_dir():
            remove_tree(folder)


def _record(reg: Registry, result: RepairResult, restored: dict[str, Ingested], job_id: int | None) -> None:
    """New stat stamps for restored blobs; the artifact ready again when nothing is left unrestored."""
    now = utcnow()
    with reg.session() as s:
        for sha, got in restored.items():
            blob = s.get(Blob, sha)
            if blob is not None:
                blob.verified_at = now
                stamp = got.stamp
                blob.stat_size, blob.stat_mtime_ns, blob.stat_inode = stamp.size, stamp.mtime_ns, stamp.inode
        row = s.get(Artifact, result.artifact_id)
        if row is None or row.status == "deleted":  # removed while we worked: nothing to mark
            result.status = "deleted"
            return
        row.status = "ready" if result.ok else "corrupt"
        result.status = row.status
        if not result.damaged:
            record_event(s, "verified_ok", row.id, job_id, quick=False, problems=[], by="repair")
        else:
            record_event(s, "repaired" if result.ok else "repair_failed", row.id, job_id,
                         restored=result.restored, unrestorable=result.unrestorable)
