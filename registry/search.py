"""Searching the catalog (GET /v1/artifacts, the web catalog) and an artifact's lineage graph.

A search is four queries whatever the page size: the count, the page's artifact columns, and the file counts
and tags of those artifacts only. No row loads its files or metadata (catalog.summary on ORM objects loads
each artifact's files: 50 lazy loads per page), so a search over 10,000 artifacts takes milliseconds.
"""
from __future__ import annotations

import re
from typing import Any

from sqlalchemy import String, Text, and_, cast, func, literal, or_, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session

from .catalog import check_kind, resolve, summary_of
from .errors import BadInput
from .models import Artifact, Edge, File, Tag

MAX_LIMIT = 1000
META_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}(\.[A-Za-z0-9_-]{1,64}){0,7}$")
_SUMMARY_COLUMNS = (Artifact.id, Artifact.name, Artifact.kind, Artifact.status, Artifact.digest,
                    Artifact.total_size, Artifact.created_at, Artifact.source_repo, Artifact.source_revision,
                    Artifact.source_path, Artifact.source_endpoint, Artifact.source_ref)


def parse_meta_filters(pairs: list[str]) -> dict[str, str]:
    """`KEY=VALUE` strings (`--meta` / `?meta=`) as a dict; a nested key is dotted: quantization_config.bits=4."""
    filters = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise BadInput(f"meta filter {pair!r} is not KEY=VALUE (e.g. model_type=llama)")
        filters[key] = value
    return filters


def search_artifacts(session: Session, q: str | None = None, kind: str | None = None, base: str | None = None,
                     meta: dict[str, str] | None = None, include_deleted: bool = False, limit: int = 50,
                     offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Artifacts matching every filter given, newest first, as catalog.summary dicts; and how many match.

    q: a case-insensitive substring of the name. kind: one of the kinds. base: a ref; artifacts whose lineage
    parent (in any role) it is. meta: {KEY: VALUE}, each compared with the metadata value as text (a string as
    it is, a number as written, true/false). include_deleted: removed artifacts too.
    """
    if not 1 <= limit <= MAX_LIMIT:
        raise BadInput(f"limit {limit} is out of range; use 1 to {MAX_LIMIT}")
    if offset < 0:
        raise BadInput(f"offset {offset} is negative")
    for what, text in (("q", q), ("base", base), *(("meta", f"{k}={v}") for k, v in (meta or {}).items())):
        if text is not None and "\x00" in text:  # PostgreSQL refuses NUL in text: bad input, not a server error
            raise BadInput(f"{what} must not contain a NUL character")
    conditions = []
    if q:
        conditions.append(Artifact.name.icontains(q, autoescape=True))
    if kind is not None:
        conditions.append(Artifact.kind == check_kind(kind))
    if not include_deleted:
        conditions.append(Artifact.status != "deleted")
    if base is not None:
        parent_id = resolve(session, base).id
        conditions.append(Artifact.id.in_(select(Edge.child_id).where(Edge.parent_id == parent_id)))
    dialect = session.get_bind().dialect.name
    conditions += [_meta_equals(dialect, key, value) for key, value in (meta or {}).items()]

    total = session.scalar(select(func.count()).select_from(Artifact).where(*conditions))
    # (A count(*) OVER () column instead of a second query is slower: it makes the database sort every
    # matching row instead of keeping the top `limit + offset`.)
    rows = session.execute(select(*_SUMMARY_COLUMNS).where(*conditions)
                           .order_by(Artifact.created_at.desc(), Artifact.id.desc()).limit(limit).offset(offset)).all()
    ids = [r.id for r in rows]
    counts: dict[int, int] = {}
    tags: dict[int, list[str]] = {}
    if ids:
        counts = dict(session.execute(select(File.artifact_id, func.count()).where(File.artifact_id.in_(ids))
                                      .group_by(File.artifact_id)).all())
        for artifact_id, name in session.execute(select(Tag.artifact_id, Tag.name).where(Tag.artifact_id.in_(ids))
                                                 .order_by(Tag.name)):
            tags.setdefault(artifact_id, []).append(name)
    return [summary_of(r, counts.get(r.id, 0), tags.get(r.id, [])) for r in rows], total


def _meta_equals(dialect: str, key: str, value: str):
    """SQL: metadata value `key` (dotted: nested) has the text `value`, the same on SQLite and PostgreSQL: a
    string as it is, a number as JSON writes it, true/false; an absent key or null never matches."""
    if not META_KEY_RE.match(key):
        raise BadInput(f"meta key {key!r} is not valid: use letters, digits, '_' and '-', dotted for nested keys "
                       "(e.g. model_type or quantization_config.bits)")
    parts = key.split(".")
    if dialect == "postgresql":
        return Artifact.meta.op("#>>")(literal(parts, ARRAY(Text))) == value
    # SQLite's json_extract gives 1/0 for true/false (PostgreSQL's #>> gives 'true'/'false'): booleans are told
    # apart by json_type, asked second so that most rows are parsed once.
    path = "$" + "".join(f'."{p}"' for p in parts)
    text_of = cast(func.json_extract(Artifact.meta, path), String) == value
    json_kind = func.json_type(Artifact.meta, path)
    if value in ("true", "false"):
        return or_(json_kind == value, and_(text_of, json_kind == "text"))
    return and_(text_of, json_kind.not_in(("true", "false")))


def lineage_graph(session: Session, artifact: Artifact) -> dict[str, list[dict[str, Any]]]:
    """The artifact with all its ancestors and all its descendants (not their other relatives): nodes
    {id, name, kind, digest, status} and every edge among them {parent, child, role} by node id (a merged
    model's base is drawn even when the walk reached it through the adapter). One query per generation."""
    ids = {artifact.id}
    for mine, theirs in ((Edge.child_id, Edge.parent_id), (Edge.parent_id, Edge.child_id)):  # up, then down
        seen, frontier = {artifact.id}, {artifact.id}
        while frontier:
            frontier = set(session.scalars(select(theirs).where(mine.in_(frontier)))) - seen
            seen |= frontier
        ids |= seen
    edges = session.execute(select(Edge.parent_id, Edge.child_id, Edge.role)
                            .where(Edge.parent_id.in_(ids), Edge.child_id.in_(ids))
                            .order_by(Edge.parent_id, Edge.child_id, Edge.role)).all()
    rows = session.execute(select(Artifact.id, Artifact.name, Artifact.kind, Artifact.digest, Artifact.status)
                           .where(Artifact.id.in_(ids)).order_by(Artifact.id)).all()
    return {"nodes": [{"id": r.id, "name": r.name, "kind": r.kind, "digest": r.digest, "status": r.status}
                      for r in rows],
            "edges": [{"parent": p, "child": c, "role": r} for p, c, r in edges]}
