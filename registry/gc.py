"""Garbage collection: unreferenced blobs, stale temporary files, snapshots of deleted artifacts."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from sqlalchemy import select

from .catalog import record_event
from .core import Registry
from .export import remove_tree
from .models import Artifact, Blob, File

ORPHAN_GRACE_SECONDS = 3600  # a blob file with no row may belong to an import that has not registered yet


@dataclass
class GcReport:
    """What gc removed (or, with dry_run, would remove) and the bytes freed."""

    dry_run: bool
    blobs: list[str] = field(default_factory=list)
    temp_files: list[str] = field(default_factory=list)
    snapshots: list[str] = field(default_factory=list)
    bytes_freed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def collect_garbage(reg: Registry, dry_run: bool = False, grace_seconds: float = ORPHAN_GRACE_SECONDS) -> GcReport:
    """Delete blobs no live file references, stale temp files and stale snapshots."""
    report = GcReport(dry_run)
    store = reg.store
    with reg.session() as s:
        referenced = set(s.scalars(select(File.sha256).distinct()))
        for blob in s.scalars(select(Blob)).all():
            if blob.sha256 in referenced:
                continue
            report.blobs.append(blob.sha256)
            if store.exists(blob.sha256):
                report.bytes_freed += store.path(blob.sha256).stat().st_size
            if not dry_run:
                s.delete(blob)
                store.delete(blob.sha256)  # inside the transaction, so an import cannot re-reference it
        known = set(s.scalars(select(Blob.sha256)))
        live = {a.digest.split(":", 1)[1] for a in s.scalars(select(Artifact).where(Artifact.status != "deleted"))}
        _orphans(reg, report, known | set(report.blobs), grace_seconds, dry_run)
        _temp_files(reg, report, dry_run)
        _snapshots(reg, report, live, dry_run)
        if not dry_run and (report.blobs or report.temp_files or report.snapshots):
            record_event(s, "gc", blobs=len(report.blobs), bytes_freed=report.bytes_freed,
                         temp_files=len(report.temp_files), snapshots=len(report.snapshots))
    return report


def _orphans(reg: Registry, report: GcReport, known: set[str], grace: float, dry_run: bool) -> None:
    cutoff = time.time() - grace
    for sha, path in reg.store.iter_blobs():
        if sha in known or path.stat().st_ctime > cutoff:
            continue
        report.blobs.append(sha)
        report.bytes_freed += path.stat().st_size
        if not dry_run:
            path.unlink(missing_ok=True)


def _temp_files(reg: Registry, report: GcReport, dry_run: bool) -> None:
    for path in reg.store.stale_temp_files():
        report.temp_files.append(path.name)
        report.bytes_freed += path.stat().st_size
        if not dry_run:
            path.unlink(missing_ok=True)


def _snapshots(reg: Registry, report: GcReport, live: set[str], dry_run: bool) -> None:
    root = reg.settings.snapshots_dir
    if not root.is_dir():
        return
    for path in sorted(root.iterdir()):
        if path.name in live:
            continue
        report.snapshots.append(path.name)
        if not dry_run:
            remove_tree(path)
