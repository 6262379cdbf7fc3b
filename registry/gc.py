"""Garbage collection: unreferenced blobs, stale temporary files and folders, snapshots of deleted artifacts.

Blobs are removed under the exclusive gc lock, rows first: gc commits the deletion of the rows of blobs that
no file references and no running ingest has pinned, then deletes their files (gclock.py says why this can
never leave an artifact without its blob). An operation that ends without registering what it stored (a
failed or cancelled job) gives those blobs such an unreferenced row as it ends, so they go at the next gc.
Blob files with no row and no pin are orphans whose writer may still be running (or crashed): they are kept
for ORPHAN_GRACE_SECONDS after they entered the store.

Temporary entries (`<home>/tmp`): an entry is in flight while its process holds its lock (a file's own
flock, a scratch folder's `.lock`). gc removes an entry only while holding that lock itself, and a creator
checks after locking that the name is still its own (store.py), so the two steps of creating and locking are
safe; gc also leaves alone anything written in the last TEMP_MIN_AGE seconds, a cheap second guard. Partial
downloads of a pull are kept for a resume window (REGISTRY_PARTIAL_TTL seconds, default 24 h) unless
`gc --all-temp`.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

from sqlalchemy import delete, select

from .catalog import record_event
from .core import Registry
from .db import db_now
from .errors import BadInput
from .gclock import GcSection, release_pins_of_gone_processes
from .models import Artifact, Blob, BlobPin, File
from .store import remove_tree

# A blob file with no row and no pin: its writer may still be running with an expired pin, or crashed.
ORPHAN_GRACE_SECONDS = 3600
TEMP_MIN_AGE_SECONDS = 120
PARTIAL_TTL_SECONDS = 24 * 3600


@dataclass
class GcReport:
    """What gc removed (or, with dry_run, would remove) and the bytes freed."""

    dry_run: bool
    blobs: list[str] = field(default_factory=list)
    temp_files: list[str] = field(default_factory=list)
    snapshots: list[str] = field(default_factory=list)
    bytes_freed: int = 0
    partials_kept: list[str] = field(default_factory=list)  # resumable pull downloads inside their window

    def to_dict(self) -> dict:
        return asdict(self)


def partial_ttl() -> float:
    """How long a pull's partial download is kept for resuming: REGISTRY_PARTIAL_TTL seconds (default 24 h)."""
    raw = os.environ.get("REGISTRY_PARTIAL_TTL", "").strip()
    if not raw:
        return PARTIAL_TTL_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise BadInput(f"REGISTRY_PARTIAL_TTL={raw!r} is not a number of seconds; use e.g. 86400 (24 h)")
    return value


def collect_garbage(reg: Registry, dry_run: bool = False, grace_seconds: float = ORPHAN_GRACE_SECONDS,
                    all_temp: bool = False) -> GcReport:
    """Delete blobs nothing references or pins, stale temp entries and stale snapshots."""
    reg.ensure_catalog()  # a lost catalog references nothing: gc must not take every blob for garbage
    report = GcReport(dry_run)
    ttl = 0.0 if all_temp else partial_ttl()
    _blobs(reg, report, grace_seconds, dry_run)
    _temp_entries(reg, report, ttl, dry_run)
    _snapshots(reg, report, dry_run)
    if not dry_run and (report.blobs or report.temp_files or report.snapshots):
        with reg.session() as s:
            record_event(s, "gc", blobs=len(report.blobs), bytes_freed=report.bytes_freed,
                         temp_files=len(report.temp_files), snapshots=len(report.snapshots))
    return report


def _blobs(reg: Registry, report: GcReport, grace: float, dry_run: bool) -> None:
    store = reg.store
    # The walk is the slow part: done before taking any lock, so imports and heartbeats never wait on it.
    on_disk = {b.sha256: b for b in store.iter_blobs()}
    cutoff = time.time() - grace
    with GcSection(reg.settings) as s:
        now = db_now(s)
        release_pins_of_gone_processes(s, store)  # rolled back with the rest on a dry run
        referenced = set(s.scalars(select(File.sha256).distinct()))
        pinned = set(s.scalars(select(BlobPin.sha256).where(BlobPin.expires_at > now)))
        rows = set(s.scalars(select(Blob.sha256)))
        doomed_rows = sorted(rows - referenced - pinned)
        orphans = sorted(sha for sha, b in on_disk.items()
                         if sha not in rows and sha not in pinned and b.ctime < cutoff)
        report.blobs = doomed_rows + orphans
        report.bytes_freed += sum(on_disk[sha].size for sha in report.blobs if sha in on_disk)
        if dry_run:
            return
        for i in range(0, len(doomed_rows), 500):
            s.execute(delete(Blob).where(Blob.sha256.in_(doomed_rows[i:i + 500])))
        s.execute(delete(BlobPin).where(BlobPin.expires_at <= now))
        s.commit()
        # Only now, with the rows gone for good and the lock still held, do the files go.
        for sha in report.blobs:
            store.delete(sha)


def _temp_entries(reg: Registry, report: GcReport, partial_ttl_seconds: float, dry_run: bool) -> None:
    for entry in reg.store.temp_entries():
        if entry.is_partial and entry.age < max(partial_ttl_seconds, TEMP_MIN_AGE_SECONDS):
            report.partials_kept.append(entry.name)
            continue
        if entry.age < TEMP_MIN_AGE_SECONDS:
            continue  # just created: leave it to its creator (see the module docstring)
        if dry_run or reg.store.remove_temp(entry):
            report.temp_files.append(entry.name)
            report.bytes_freed += entry.size


def _snapshots(reg: Registry, report: GcReport, dry_run: bool) -> None:
    root = reg.settings.snapshots_dir
    if not root.is_dir():
        return
    # Listed before reading which artifacts are live: a snapshot made for an artifact registered after that
    # read is not in the list, so it cannot be taken for a stale one.
    listed = sorted(root.iterdir())
    with reg.read_session() as s:
        live = {a.digest.split(":", 1)[1] for a in s.scalars(select(Artifact).where(Artifact.status != "deleted"))}
    for path in listed:
        if path.name in live:
            continue
        report.snapshots.append(path.name)
        if not dry_run:
            try:
                remove_tree(path)
            except FileNotFoundError:
                pass  # another gc removed it first
