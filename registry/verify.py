"""Verification: re-hash every blob against the manifest (or, with quick, compare stat stamps)."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import select

from .catalog import list_artifacts, load, record_event
from .core import Registry
from .errors import BadInput
from .models import Artifact, Blob, File, utcnow
from .progress import NullReporter, Reporter
from .store import StatStamp, hash_file


@dataclass
class FileCheck:
    """One file's outcome: ok, mismatch, missing, wrong_size or changed (quick only)."""

    path: str
    status: str
    expected: str
    actual: str | None = None
    expected_size: int | None = None
    actual_size: int | None = None


@dataclass
class ArtifactCheck:
    """One artifact's outcome and the files that were not ok."""

    name: str
    digest: str
    ok: bool
    quick: bool
    bytes_read: int
    files: list[FileCheck] = field(default_factory=list)
    # Other live artifacts marked corrupt because they share a damaged or missing blob with this one.
    also_corrupt: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[FileCheck]:
        return [f for f in self.files if f.status != "ok"]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Target:
    sha256: str
    size: int
    stamp: StatStamp | None


def verify(reg: Registry, refs: list[str | int] | None = None, all_artifacts: bool = False, quick: bool = False,
           reporter: Reporter | None = None, job_id: int | None = None) -> list[ArtifactCheck]:
    """Check artifacts (refs, or ids as jobs carry them) against their manifests; marks exactly the failing
    ones corrupt (never another artifact of the same digest) and records events."""
    reporter = reporter or NullReporter()
    with reg.session() as s:
        artifacts = _select(s, refs, all_artifacts)
        manifests = {a.id: [(f.path, f.sha256, f.size) for f in a.files] for a in artifacts}
        blobs = {b.sha256: b for b in s.scalars(select(Blob).where(
            Blob.sha256.in_({sha for files in manifests.values() for _, sha, _ in files})))}
    targets = {sha: _Target(sha, size, _stamp(blobs.get(sha)))
               for files in manifests.values() for _, sha, size in files}
    outcomes = _check_blobs(reg, list(targets.values()), quick, reporter)
    reports = [_report(a, manifests[a.id], outcomes, quick) for a in artifacts]
    _record(reg, artifacts, reports, outcomes, quick, job_id)
    return reports


def _select(session, refs: list[str | int] | None, all_artifacts: bool) -> list[Artifact]:
    if all_artifacts:
        return [a for a in list_artifacts(session)]
    if not refs:
        raise BadInput("name at least one artifact to verify, or pass --all")
    unique: dict[int, Artifact] = {}
    for ref in refs:
        artifact = load(session, ref)
        unique.setdefault(artifact.id, artifact)
    return list(unique.values())


def _stamp(blob: Blob | None) -> StatStamp | None:
    if blob is None or blob.stat_mtime_ns is None:
        return None
    return StatStamp(blob.stat_size, blob.stat_mtime_ns, blob.stat_inode)


def _check_blobs(reg: Registry, targets: list[_Target], quick: bool, reporter: Reporter) -> dict[str, tuple]:
    """Outcome per blob: (status, actual digest or None, actual size or None, new stamp or None)."""
    if quick:
        reporter.start(len(targets), "files", "checking stamps")
        return {t.sha256: _quick_one(reg, t) for t in targets}
    reporter.start(sum(t.size for t in targets), "B", "verifying")
    # Largest first so the last worker is not left alone with the biggest shard.
    ordered = sorted(targets, key=lambda t: -t.size)
    with ThreadPoolExecutor(max(1, min(len(ordered), os.cpu_count() or 1))) as pool:
        results = list(pool.map(lambda t: _full_one(reg, t, reporter), ordered))
    reporter.finish()
    return {t.sha256: r for t, r in zip(ordered, results)}


def _quick_one(reg: Registry, target: _Target) -> tuple:
    path = reg.store.path(target.sha256)
    try:
        now = StatStamp.of(path)
    except FileNotFoundError:
        return ("missing", None, None, None)
    if now.size != target.size:
        return ("wrong_size", None, now.size, None)
    if target.stamp is None or now != target.stamp:
        return ("changed", None, now.size, None)
    return ("ok", target.sha256, now.size, None)


def _full_one(reg: Registry, target: _Target, reporter: Reporter) -> tuple:
    path = reg.store.path(target.sha256)
    try:
        before = StatStamp.of(path)
    except FileNotFoundError:
        return ("missing", None, None, None)
    if before.size != target.size:
        reporter.advance(target.size)
        return ("wrong_size", None, before.size, None)
    actual, size = hash_file(path, reporter.advance)
    status = "ok" if actual == target.sha256 else "mismatch"
    return (status, actual, size, before if status == "ok" else None)


def _report(artifact: Artifact, files: list[tuple[str, str, int]], outcomes: dict[str, tuple],
            quick: bool) -> ArtifactCheck:
    checks = []
    bytes_read = 0
    for path, sha, size in files:
        status, actual, actual_size, _ = outcomes[sha]
        if not quick and status in ("ok", "mismatch"):
            bytes_read += size
        checks.append(FileCheck(path, status, sha, actual, size, actual_size))
    ok = all(c.status == "ok" for c in checks)
    return ArtifactCheck(artifact.name, artifact.digest, ok, quick, bytes_read, checks)


def _record(reg: Registry, artifacts: list[Artifact], reports: list[ArtifactCheck], outcomes: dict[str, tuple],
            quick: bool, job_id: int | None) -> None:
    now = utcnow()
    with reg.session() as s:
        for sha, (status, _, _, stamp) in outcomes.items():
            blob = s.get(Blob, sha)
            if blob is not None and status == "ok" and stamp is not None:
                blob.verified_at = now
                blob.stat_size, blob.stat_mtime_ns, blob.stat_inode = stamp.size, stamp.mtime_ns, stamp.inode
        for artifact, report in zip(artifacts, reports):
            row = s.get(Artifact, artifact.id)
            definite = [p for p in report.problems if p.status != "changed"]
            if definite:
                row.status = "corrupt"
                report.also_corrupt = _mark_sharers(s, row, {p.expected for p in definite}, job_id)
            elif report.ok and not quick and row.status == "corrupt":
                row.status = "ready"
            kind = "verified_ok" if report.ok else "verify_failed"
            record_event(s, kind, row.id, job_id, quick=quick,
                         problems=[{"path": p.path, "status": p.status} for p in report.problems])


def _mark_sharers(session, verified: Artifact, bad_shas: set[str], job_id: int | None) -> list[str]:
    """Damage is a property of a blob, not of one artifact: every live artifact holding a damaged blob is
    corrupt too (the same folder imported under two names shares all of them). Returns their names."""
    sharers = mark_holders_corrupt(session, bad_shas, exclude_id=verified.id)
    for other, newly in sharers:
        if newly:
            record_event(session, "marked_corrupt", other.id, job_id, by_verify_of=verified.name,
                         blobs=sorted(bad_shas))
    return [other.name for other, _ in sharers]


def mark_holders_corrupt(session, bad_shas: set[str], exclude_id: int | None = None) -> list[tuple[Artifact, bool]]:
    """Mark every live artifact holding one of these blobs `corrupt` (verify, and the daemon's scrub);
    returns (artifact, whether this call marked it) by name. The caller records the events."""
    holders = select(File.artifact_id).where(File.sha256.in_(sorted(bad_shas)))
    query = select(Artifact).where(Artifact.id.in_(holders), Artifact.status != "deleted").order_by(Artifact.name)
    if exclude_id is not None:
        query = query.where(Artifact.id != exclude_id)
    marked = []
    for artifact in session.scalars(query).all():
        newly = artifact.status != "corrupt"
        artifact.status = "corrupt"
        marked.append((artifact, newly))
    return marked
