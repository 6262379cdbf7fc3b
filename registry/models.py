"""The catalog's tables as SQLAlchemy 2 typed ORM classes; Alembic migrations are made from these."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Optional

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, ForeignKey, Index, Integer, MetaData, String, Text, UniqueConstraint, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from .schema import (JOB_STATES, KINDS, ROLES, STATUSES, TOKEN_ROLES,  # noqa: F401  (kept importable here)
                     UNFINISHED_STATES)

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """Naive UTC now: the one clock every row uses, the same on SQLite and PostgreSQL."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, int: BigInteger}


class Artifact(Base):
    __tablename__ = "artifacts"
    __table_args__ = (
        # A name is unique among live artifacts; a deleted one frees its name.
        Index("uq_artifacts_live_name", "name", unique=True,
              sqlite_where=text("status != 'deleted'"), postgresql_where=text("status != 'deleted'")),
        Index("ix_artifacts_created_at_id", "created_at", "id"),  # listings: newest first
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="ready")
    digest: Mapped[str] = mapped_column(String(71), index=True)
    total_size: Mapped[int] = mapped_column(default=0)
    source_repo: Mapped[Optional[str]] = mapped_column(String(255))
    source_revision: Mapped[Optional[str]] = mapped_column(String(255))
    source_path: Mapped[Optional[str]] = mapped_column(Text)
    source_endpoint: Mapped[Optional[str]] = mapped_column(String(255))
    source_ref: Mapped[Optional[str]] = mapped_column(String(255))  # the revision asked for, e.g. main
    meta: Mapped[dict[str, Any]] = mapped_column(default=dict)  # read from the files: model_type, dtype, ...
    # How it was made (merge or quantization facts, evaluation, job, host, time); never part of the digest.
    provenance: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default=text("'{}'"))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    files: Mapped[list["File"]] = relationship(back_populates="artifact", order_by="File.path",
                                               cascade="all, delete-orphan")


class Blob(Base):
    __tablename__ = "blobs"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int]
    verified_at: Mapped[Optional[datetime]] = mapped_column(DateTime)
    stat_size: Mapped[Optional[int]]
    stat_mtime_ns: Mapped[Optional[int]]
    stat_inode: Mapped[Optional[int]]
    # The git blob id (sha1 of "blob <len>\0" + content): lets a pull skip non-LFS files the store has.
    git_sha1: Mapped[Optional[str]] = mapped_column(String(40), index=True)


class BlobPin(Base):
    """A running ingest's claim on a blob it published or reused: gc keeps pinned blobs until the
    registration that references them commits (and drops the pins) or the pin expires (a crashed job)."""
    __tablename__ = "blob_pins"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(255), primary_key=True, index=True)
    expires_at: Mapped[datetime] = mapped_column(DateTime)


class File(Base):
    __tablename__ = "files"

    artifact_id: Mapped[int] = mapped_column(ForeignKey("artifacts.id", ondelete="CASCADE"), primary_key=True)
    path: Mapped[str] = mapped_column(String(1024), primary_key=True)
    sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"), index=True)
    size: Mapped[int]

    artifact: Mapped[Artifact] = relationship(back_populates="files")


class Edge(Base):
    __tablename__ = "edges"

    child_id: Mapped[int] = mapped_column(ForeignKey("artifacts.id", ondelete="CASCADE"), primary_key=True)
    parent_id: Mapped[int] = mapped_column(ForeignKey("artifacts.id", ondelete="CASCADE"), primary_key=True,
                                           index=True)
    role: Mapped[str] = mapped_column(String(16), primary_key=True)


class Tag(Base):
    __tablename__ = "tags"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    artifact_id: Mapped[int] = mapped_column(ForeignKey("artifacts.id", ondelete="CASCADE"), index=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        # The same request twice attaches to one unfinished job.
        Index("uq_jobs_unfinished_dedup_key", "dedup_key", unique=True,
              sqlite_where=text("state IN ('queued', 'running')"),
              postgresql_where=text("state IN ('queued', 'running')")),
        Index("ix_jobs_state_run_after", "state", "run_after"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    type: Mapped[str] = mapped_column(String(32))
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    state: Mapped[str] = mapped_column(String(16), default="queued")
    dedup_key: Mapped[Optional[str]] = mapped_column(String(255))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    run_after: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    lease_owner: Mapped[Optional[str]] = mapped_column(String(255))
    lease_expires_at: Mapped[Optional[datetime]] = mapped_column(DateTime)
    heartbeat_at: Mapped[Optional[datetime]] = mapped_column(DateTime)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    progress_done: Mapped[int] = mapped_column(default=0)
    progress_total: Mapped[Optional[int]]
    progress_unit: Mapped[Optional[str]] = mapped_column(String(16))
    message: Mapped[Optional[str]] = mapped_column(Text)
    error: Mapped[Optional[str]] = mapped_column(Text)
    exit_code: Mapped[Optional[int]] = mapped_column(Integer)
    result: Mapped[Optional[dict[str, Any]]]
    result_artifact_id: Mapped[Optional[int]] = mapped_column(ForeignKey("artifacts.id", ondelete="SET NULL"))
    # Runs only after this job succeeded (a quantize after its merge); fails with it when it fails.
    after_job_id: Mapped[Optional[int]] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[Optional[datetime]] = mapped_column(DateTime)
    finished_at: Mapped[Optional[datetime]] = mapped_column(DateTime)


class Trigger(Base):
    """What made the daemon queue a job: a dropped folder, a finished checkpoint, a pipeline rule on an
    artifact, a followed commit. Unique per (source, key), and written in the transaction that queues the job,
    so the same cause never queues twice, whatever crashes in between."""
    __tablename__ = "triggers"
    __table_args__ = (UniqueConstraint("source", "key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source: Mapped[str] = mapped_column(String(32))  # drop, training, pipeline, follow
    key: Mapped[str] = mapped_column(String(64))  # sha256 of `subject`, so any path fits
    subject: Mapped[str] = mapped_column(Text)  # readable: the folder and its fingerprint, rule and artifact
    job_id: Mapped[Optional[int]] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Event(Base):
    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))
    artifact_id: Mapped[Optional[int]] = mapped_column(ForeignKey("artifacts.id", ondelete="SET NULL"), index=True)
    job_id: Mapped[Optional[int]] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # Who did it through `registry serve`: "token:NAME" or "anonymous"; None for the CLI and workers on this host.
    actor: Mapped[Optional[str]] = mapped_column(String(255))


class Token(Base):
    """An API token for `registry serve`. Only the sha256 of the secret is kept: a leaked database dump grants
    nothing. A name is unique among live tokens; a revoked token keeps its row (events name it) and frees it."""
    __tablename__ = "tokens"
    __table_args__ = (
        Index("uq_tokens_live_name", "name", unique=True,
              sqlite_where=text("revoked_at IS NULL"), postgresql_where=text("revoked_at IS NULL")),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16))  # read, write or admin (schema.TOKEN_ROLES)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of the whole secret
    prefix: Mapped[str] = mapped_column(String(12))  # the secret's first characters after "rgt_", to tell them apart
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_used_at: Mapped[Optional[datetime]] = mapped_column(DateTime)
    revoked_at: Mapped[Optional[datetime]] = mapped_column(DateTime)
