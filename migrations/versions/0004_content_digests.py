"""content digests: the digest covers kind and files only; provenance moves to its own column

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 12:00:00.000000

Schema 1 digests hashed the metadata too, including library versions, the device and the float result of
`merge --check`, so equal files could get different digests. This adds `artifacts.provenance`, moves the
keys that are not a function of the content (`merge`, `quantization`, `evaluation`) from `meta` into it, and
recomputes every digest from the artifact's kind and files. Tags, lineage and events refer to artifacts by
id, so they keep working. A deleted artifact has no file rows left; its old digest is kept.

The digest code is copied here on purpose: a migration must keep computing what it computed when written.
"""
import hashlib
import json
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0004'
down_revision: Union[str, Sequence[str], None] = '0003'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

PROVENANCE_KEYS = ("merge", "quantization", "evaluation")
# Where provenance names another artifact by digest: rewritten to that artifact's new digest.
DIGEST_REFS = (("merge", "base_digest"), ("merge", "adapter_digest"), ("quantization", "source_digest"))

artifacts = sa.table("artifacts", sa.column("id", sa.Integer), sa.column("kind", sa.String),
                     sa.column("digest", sa.String), sa.column("meta", sa.JSON), sa.column("provenance", sa.JSON))
files = sa.table("files", sa.column("artifact_id", sa.Integer), sa.column("path", sa.String),
                 sa.column("size", sa.BigInteger), sa.column("sha256", sa.String))


def _digest(manifest: dict) -> str:
    raw = json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def _manifest(schema: int, kind: str, rows: list, meta: dict | None = None) -> dict:
    manifest = {"schema": schema, "kind": kind,
                "files": [{"path": p, "size": s, "sha256": h} for p, s, h in sorted(rows)]}
    if schema == 1:
        manifest["metadata"] = meta
    return manifest


def _rows(conn) -> list:
    found = conn.execute(sa.select(artifacts.c.id, artifacts.c.kind, artifacts.c.digest, artifacts.c.meta,
                                   artifacts.c.provenance).order_by(artifacts.c.id)).all()
    by_artifact: dict[int, list] = {}
    for artifact_id, path, size, sha in conn.execute(sa.select(files.c.artifact_id, files.c.path, files.c.size,
                                                               files.c.sha256)):
        by_artifact.setdefault(artifact_id, []).append((path, size, sha))
    return [(r.id, r.kind, r.digest, dict(r.meta or {}), dict(r.provenance or {}), by_artifact.get(r.id, []))
            for r in found]


def _rewrite_refs(record: dict, renamed: dict[str, str]) -> None:
    for section, key in DIGEST_REFS:
        value = (record.get(section) or {}).get(key)
        if value in renamed:
            record[section][key] = renamed[value]


def upgrade() -> None:
    """Upgrade schema."""
    # A server default lets SQLite add a NOT NULL column in place (no table rebuild, which would cascade).
    with op.batch_alter_table('artifacts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('provenance', sa.JSON(), nullable=False, server_default=sa.text("'{}'")))
    conn = op.get_bind()
    rows = _rows(conn)
    renamed = {old: _digest(_manifest(2, kind, fs)) for _, kind, old, _, _, fs in rows if fs}
    for artifact_id, _, old, meta, provenance, fs in rows:
        for key in PROVENANCE_KEYS:
            if key in meta:
                provenance[key] = meta.pop(key)
        _rewrite_refs(provenance, renamed)
        if fs:
            provenance["schema_1_digest"] = old
        conn.execute(artifacts.update().where(artifacts.c.id == artifact_id)
                     .values(meta=meta, provenance=provenance, digest=renamed.get(old, old) if fs else old))


def downgrade() -> None:
    """Downgrade schema: provenance back into meta, digests recomputed the schema 1 way."""
    conn = op.get_bind()
    renamed: dict[str, str] = {}
    # In id order, so a parent's new digest is known before a child's metadata that names it is hashed.
    for artifact_id, kind, digest, meta, provenance, fs in _rows(conn):
        meta.update({k: provenance[k] for k in PROVENANCE_KEYS if k in provenance})
        _rewrite_refs(meta, renamed)
        new = _digest(_manifest(1, kind, fs, meta)) if fs else digest
        renamed[digest] = new
        conn.execute(artifacts.update().where(artifacts.c.id == artifact_id).values(meta=meta, digest=new))
    # Plain DROP COLUMN (SQLite >= 3.35, PostgreSQL): a batch rebuild of `artifacts` would cascade-delete files.
    op.execute("ALTER TABLE artifacts DROP COLUMN provenance")
