"""`registry fsck`: compare the catalog with the store, and rebuild a lost catalog from the store's records.

Every registered artifact's record (records.py) lives in the store beside the blobs, so the catalog is a
rebuildable index: `fsck --rebuild-catalog` restores artifacts, files, blobs, tags and lineage into an empty
catalog. Until then, a command that finds an empty catalog beside a store that holds data refuses to run:
taking it for a new registry would let gc delete every blob.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select

from .catalog import artifact_record, list_artifacts, record_event
from .errors import Conflict, OperationFailed
from .manifest import build_manifest, manifest_digest
from .models import Artifact, Blob, Edge, Event, File, Job, Tag

if TYPE_CHECKING:
    from .core import Registry

# A blob file younger than this may belong to a first import that has not registered yet (gc's grace too).
BLOB_EVIDENCE_AGE_SECONDS = 3600


def _catalog_label(reg: "Registry") -> str:
    from sqlalchemy.engine import make_url

    url = make_url(reg.settings.database_url)
    if url.get_backend_name() == "sqlite":
        return url.database or ":memory:"
    return url.render_as_string(hide_password=True)


def _never_used(session) -> bool:
    # Jobs and blob rows count too: a first import that failed (disk full) leaves both, and its orphan blobs
    # must not make the next command take this catalog for a lost one.
    return not any(session.scalar(select(func.count()).select_from(table)) for table in (Artifact, Event, Job, Blob))


def refuse_lost_catalog(reg: "Registry") -> None:
    """Raise when the catalog is empty (never used) but the store holds artifact records or settled blobs."""
    from .db import session_scope

    with session_scope(reg.settings, write=False) as s:  # one read at start-up; takes no SQLite write lock
        if not _never_used(s):
            return
    records = reg.store.records.count()
    blobs = settled = 0
    cutoff = time.time() - BLOB_EVIDENCE_AGE_SECONDS
    for blob in reg.store.iter_blobs():
        settled += blob.ctime < cutoff  # ctime: when it entered the store (a --link blob keeps an old mtime)
        blobs += 1
    if records or settled:
        raise OperationFailed(
            f"the catalog {_catalog_label(reg)} is empty but the store {reg.home} holds {blobs} blobs "
            f"({records} artifact records): the catalog was lost or is the wrong one; run "
            "`registry fsck --rebuild-catalog`, or point REGISTRY_DATABASE_URL at the right database")


@dataclass
class FsckReport:
    """Where the catalog and the store disagree; `ok` when they do not."""

    artifacts: int = 0
    records: int = 0
    missing_blobs: list[dict[str, str]] = field(default_factory=list)  # catalog files whose blob is absent
    unrecorded: list[str] = field(default_factory=list)  # live artifacts without a matching record
    orphan_records: list[str] = field(default_factory=list)  # records with no live artifact of that digest
    damaged_records: list[str] = field(default_factory=list)
    tag_mismatches: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)  # with --write-records

    @property
    def ok(self) -> bool:
        return not (self.missing_blobs or self.unrecorded or self.orphan_records or self.damaged_records
                    or self.tag_mismatches)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def check(reg: "Registry", write_records: bool = False) -> FsckReport:
    """Compare live artifacts and tags with the store's blobs and records (and, if asked, write missing records)."""
    records = dict(reg.store.records.live())
    report = FsckReport(records=len(records))
    report.damaged_records = sorted(n for n, r in records.items() if r is None)
    with reg.read_session() as s:
        live = list_artifacts(s)
        report.artifacts = len(live)
        by_name = {a.name: a for a in live}
        for a in live:
            for f in a.files:
                if not reg.store.exists(f.sha256):
                    report.missing_blobs.append({"name": a.name, "path": f.path, "sha256": f.sha256})
            if (records.get(a.name) or {}).get("digest") != a.digest:
                report.unrecorded.append(a.name)
                if write_records:
                    reg.store.records.put(artifact_record(a, _parents(s, a)))
                    report.written.append(a.name)
        tags = {t.name: _tag_target(s, t) for t in s.scalars(select(Tag))}
        if write_records:
            for tag, (name, digest) in tags.items():
                reg.store.records.put_tag(tag, name, digest)
    stored_tags = {t["tag"]: (t["name"], t["digest"]) for t in reg.store.records.tags()}
    if not write_records:
        report.tag_mismatches = sorted(t for t in set(tags) | set(stored_tags) if tags.get(t) != stored_tags.get(t))
    report.orphan_records = sorted(n for n, r in records.items()
                                   if r is not None and (n not in by_name or by_name[n].digest != r["digest"]))
    if write_records:
        report.unrecorded = []
    return report


def _tag_target(session, tag: Tag) -> tuple[str, str]:
    a = session.get(Artifact, tag.artifact_id)
    return a.name, a.digest


def _parents(session, artifact: Artifact) -> list[tuple[str, str, str]]:
    rows = session.execute(select(Edge.role, Artifact.name, Artifact.digest)
                           .join(Artifact, Artifact.id == Edge.parent_id).where(Edge.child_id == artifact.id)).all()
    return [(name, digest, role) for role, name, digest in rows]


@dataclass
class RebuildReport:
    """What `fsck --rebuild-catalog` restored."""

    artifacts: list[str] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)  # restored, but some blobs are not in the store
    skipped: list[str] = field(default_factory=list)  # damaged records, or a digest that does not match
    edges: int = 0
    tags: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rebuild_catalog(reg: "Registry") -> RebuildReport:
    """Fill an empty catalog from the store's records: artifacts, files, blobs, lineage and tags."""
    report = RebuildReport()
    usable = []
    for name, record in reg.store.records.live():
        files = (record or {}).get("files", [])
        if record is None or manifest_digest(build_manifest(
                record["kind"], ((f["path"], f["size"], f["sha256"]) for f in files))) != record["digest"]:
            report.skipped.append(name)
            continue
        usable.append(record)
    usable.sort(key=lambda r: (r["created_at"], r["name"]))  # parents first, ids in their original order
    with reg._session() as s:
        count = s.scalar(select(func.count()).select_from(Artifact))
        if count:
            raise Conflict(f"the catalog {_catalog_label(reg)} already holds {count} artifacts; --rebuild-catalog "
                           "only fills an empty catalog (point REGISTRY_DATABASE_URL at a new database)")
        made: dict[tuple[str, str], Artifact] = {}
        blobs: set[str] = set()
        for r in usable:
            for f in r["files"]:  # not verified, no stat stamp: a full `registry verify` re-hashes and records them
                if f["sha256"] not in blobs:
                    blobs.add(f["sha256"])
                    s.add(Blob(sha256=f["sha256"], size=f["size"]))
            missing = any(not reg.store.exists(f["sha256"]) for f in r["files"])
            src = r.get("source") or {}
            a = Artifact(name=r["name"], kind=r["kind"], status="incomplete" if missing else "ready",
                         digest=r["digest"], meta=r.get("meta") or {}, provenance=r.get("provenance") or {},
                         total_size=sum(f["size"] for f in r["files"]), source_repo=src.get("repo"),
                         source_revision=src.get("revision"), source_path=src.get("path"),
                         source_endpoint=src.get("endpoint"), source_ref=src.get("ref"),
                         created_at=datetime.fromisoformat(r["created_at"].rstrip("Z")))
            a.files = [File(path=f["path"], sha256=f["sha256"], size=f["size"]) for f in r["files"]]
            s.add(a)
            s.flush()
            made[(a.name, a.digest)] = a
            report.artifacts.append(a.name)
            if missing:
                report.incomplete.append(a.name)
            record_event(s, "rebuilt", a.id, name=a.name, digest=a.digest)
        for r in usable:
            child = made[(r["name"], r["digest"])]
            for p in r.get("parents", []):
                parent = made.get((p["name"], p["digest"]))
                if parent is not None:
                    s.add(Edge(child_id=child.id, parent_id=parent.id, role=p["role"]))
                    report.edges += 1
        by_name = {name: a for (name, _), a in made.items()}
        for t in reg.store.records.tags():
            a = by_name.get(t["name"])
            if a is not None and a.digest == t["digest"]:
                s.add(Tag(name=t["tag"], artifact_id=a.id))
                report.tags += 1
        # Marks the catalog as in use even when nothing was restored, so commands run again.
        record_event(s, "catalog_rebuilt", artifacts=len(report.artifacts), tags=report.tags, edges=report.edges)
    return report
