"""The catalog: registering artifacts, resolving refs, listing, showing, tagging and removing."""
from __future__ import annotations

import dataclasses
import logging
import re
import socket
from dataclasses import dataclass
from typing import Any, Iterable

from sqlalchemy import event, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from .errors import BadInput, Conflict, NotFound, OperationFailed
from .schema import check_one_match, digest_prefix
from .gclock import check_blobs_for_registration
from .jobs import check_fence
from .manifest import build_manifest, manifest_digest
from .models import KINDS, Artifact, Blob, Edge, Event, File, Job, Tag, utcnow
from .store import BlobStore, Ingested

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/:@+]*$")


@dataclass
class Registered:
    """What an operation that registers an artifact returns: which one, and whether this call created it."""

    artifact_id: int
    name: str
    digest: str
    files: int
    size: int
    created: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_name(name: str, what: str = "name") -> str:
    """Refuse names with `..`, spaces, leading symbols, or that look like a digest."""
    # Any case: refs match a digest prefix case-insensitively, so `SHA256:1A2B...` would shadow a digest ref.
    if not name or len(name) > 255 or not NAME_RE.match(name) or ".." in name or name.lower().startswith("sha256:"):
        raise BadInput(f"invalid {what} {name!r}: use letters, digits and . _ - / : @ + without '..' "
                       "(e.g. llama-7b or org/model:v1)")
    return name


def check_not_a_tag(session: Session, name: str) -> None:
    """Refuse an artifact name that is already a tag: names and tags share one namespace (a ref looks up tags
    first, so the new artifact would be unreachable by its name)."""
    tag = session.get(Tag, name)
    if tag is not None:
        target = session.get(Artifact, tag.artifact_id)
        raise Conflict(f"{name!r} is already a tag (pointing at {target.name}); names and tags share one "
                       "namespace: choose another --name, or move the tag away first")


def check_tag(session: Session, tag_name: str, own_name: str | None = None) -> None:
    """Refuse a tag that is not a valid name, or is a live artifact's name: the name of the artifact it will
    point at (`own_name`) or of another one. Commands that make an artifact call it before any work too."""
    check_name(tag_name, "tag")
    # One namespace: a tag equal to a live artifact's name would hide it (refs look up tags first), and one
    # equal to this artifact's own name could never move to another artifact later.
    if tag_name == own_name:
        raise Conflict(f"tag {tag_name!r} is the artifact's own name; names and tags share one namespace: "
                       f"choose another tag, e.g. {tag_name}:prod")
    clash = session.scalars(select(Artifact).where(Artifact.name == tag_name, Artifact.status != "deleted")).first()
    if clash is not None:
        raise Conflict(f"tag {tag_name!r} is the name of another artifact ({clash.digest[:19]}); names and tags "
                       f"share one namespace: choose another tag, or remove that artifact (registry rm {tag_name})")


def check_new_name(session: Session, name: str) -> None:
    """What a command that makes an artifact checks before any work (download, merge, GPTQ): the name is valid
    and not a tag. register_artifact checks again (another process may tag it meanwhile), and also refuses a
    name that other content holds, which only the digest of the finished work can tell."""
    check_name(name)
    check_not_a_tag(session, name)


def merged_name(adapter_name: str) -> str:
    """merge's default name for its result (here, so the CLI can check it without importing torch)."""
    return f"{adapter_name}-merged"


def quantized_name(source_name: str, bits: int) -> str:
    """quantize's default name for its result."""
    return f"{source_name}-gptq-int{bits}"


def name_available(session: Session, name: str, digest: str) -> bool:
    """Whether `name` can name an artifact with this digest: no tag and no other live content holds it
    (pull picks its default name with this)."""
    holder = session.scalars(select(Artifact).where(Artifact.name == name, Artifact.status != "deleted")).first()
    return (holder is None or holder.digest == digest) and session.get(Tag, name) is None


def check_kind(kind: str) -> str:
    """Refuse a kind that is not one of KINDS."""
    if kind not in KINDS:
        raise BadInput(f"unknown kind {kind!r}; use one of: {', '.join(KINDS)}")
    return kind


def record_event(session: Session, event_kind: str, artifact_id: int | None = None, job_id: int | None = None,
                 **detail: Any) -> None:
    """Append one event to the log, naming who did it when the session says (the server sets "actor")."""
    session.add(Event(kind=event_kind, artifact_id=artifact_id, job_id=job_id, detail=detail,
                      actor=session.info.get("actor")))


def resolve(session: Session, ref: str) -> Artifact:
    """Find a live artifact by tag, name or `sha256:` digest prefix (at least 8 hex digits).

    A digest prefix must name exactly one live artifact: two artifacts may hold the same content (the same
    folder imported under two names), and picking one of them would act on the wrong artifact.
    """
    tag = session.get(Tag, ref)
    if tag is not None:
        return session.get(Artifact, tag.artifact_id)
    by_name = session.scalars(select(Artifact).where(Artifact.name == ref, Artifact.status != "deleted")).first()
    if by_name is not None:
        return by_name
    found = session.scalars(select(Artifact).where(Artifact.digest.startswith(digest_prefix(ref)),
                                                   Artifact.status != "deleted").order_by(Artifact.name)).all()
    check_one_match(ref, [(a.name, a.digest) for a in found])
    return found[0]


def load(session: Session, ref: str | int) -> Artifact:
    """A live artifact by id (what jobs carry) or by ref (what people type)."""
    if isinstance(ref, str):
        return resolve(session, ref)
    artifact = session.get(Artifact, ref)
    if artifact is None:
        raise NotFound(f"no artifact with id {ref}; see registry list")
    if artifact.status == "deleted":
        raise NotFound(f"{artifact.name} (id {ref}) was removed; nothing was done")
    return artifact


def require_usable(artifact: Artifact) -> Artifact:
    """Refuse an artifact (or anything with its name and status) whose files are known to be damaged or missing,
    saying what to do."""
    if artifact.status == "corrupt":
        raise OperationFailed(f"{artifact.name} is corrupt (registry verify found damaged or missing files): run "
                              f"`registry verify {artifact.name}` to see which, then `registry repair {artifact.name}`")
    if artifact.status == "incomplete":
        raise OperationFailed(f"{artifact.name} is incomplete (some of its files are not in the store): run "
                              f"`registry verify {artifact.name}` to see which, then `registry repair {artifact.name}`")
    return artifact


def insert_blobs(session: Session, ingested: Iterable[Ingested]) -> None:
    """Record blobs, leaving rows that already exist untouched (a concurrent import may have added them)."""
    ingested = list(ingested)
    now = utcnow()
    rows = {i.sha256: dict(sha256=i.sha256, size=i.size, verified_at=now, stat_size=i.stamp.size,
                           stat_mtime_ns=i.stamp.mtime_ns, stat_inode=i.stamp.inode) for i in ingested}
    if not rows:
        return
    dialect = sqlite if session.get_bind().dialect.name == "sqlite" else postgresql
    session.execute(dialect.insert(Blob).values(list(rows.values())).on_conflict_do_nothing())
    for i in ingested:
        if i.git_sha1:
            session.execute(update(Blob).where(Blob.sha256 == i.sha256, Blob.git_sha1.is_(None))
                            .values(git_sha1=i.git_sha1))


def register_artifact(session: Session, store: BlobStore, *, name: str, kind: str,
                      files: dict[str, Ingested], meta: dict[str, Any], parents: Iterable[tuple[Artifact, str]] = (),
                      source: dict[str, str | None] | None = None, job_id: int | None = None,
                      provenance: dict[str, Any] | None = None) -> tuple[Artifact, bool]:
    """Insert an artifact for ingested files; returns (artifact, created).

    The digest covers the kind and the files only. Same name and digest is a no-op that keeps the first
    registration's provenance. After the transaction commits, the artifact's record is written to the store.
    """
    if job_id is not None:  # fencing: a worker whose lease was taken over registers nothing
        check_fence(session, job_id)
    check_name(name)
    check_kind(kind)
    manifest = build_manifest(kind, ((p, i.size, i.sha256) for p, i in files.items()))
    digest = manifest_digest(manifest)
    existing = session.scalars(select(Artifact).where(Artifact.name == name, Artifact.status != "deleted")).first()
    if existing is not None:
        if existing.digest == digest:
            return existing, False
        raise Conflict(f"name {name!r} is already used by {existing.digest[:19]}; choose another --name "
                       "or remove it with registry rm")
    check_not_a_tag(session, name)
    # Under the shared gc lock: every blob is present (else BlobVanished, which the job retries) and stays
    # so until this transaction commits; our pins on them end with it (gclock.py).
    check_blobs_for_registration(session, store, files.values())
    insert_blobs(session, files.values())
    source = source or {}
    now = utcnow()
    provenance = {**(provenance or {}), "job_id": job_id, "host": socket.gethostname(),
                  "created_at": now.isoformat() + "Z"}
    artifact = Artifact(name=name, kind=kind, status="ready", digest=digest, meta=meta, provenance=provenance,
                        created_at=now, total_size=sum(i.size for i in files.values()), source_repo=source.get("repo"),
                        source_revision=source.get("revision"), source_path=source.get("path"),
                        source_endpoint=source.get("endpoint"), source_ref=source.get("ref"))
    artifact.files = [File(path=p, sha256=i.sha256, size=i.size) for p, i in files.items()]
    session.add(artifact)
    session.flush()
    parents = list(parents)
    for parent, role in parents:
        session.add(Edge(child_id=artifact.id, parent_id=parent.id, role=role))
    record_event(session, "registered", artifact.id, job_id, digest=digest, name=name, kind=kind)
    record = artifact_record(artifact, [(p.name, p.digest, role) for p, role in parents])
    after_commit(session, ("artifact", name), lambda: store.records.put(record))
    return artifact, True


def artifact_manifest(artifact: Artifact) -> dict[str, Any]:
    """The manifest an artifact's digest was computed from: its kind and files."""
    return build_manifest(artifact.kind, ((f.path, f.size, f.sha256) for f in artifact.files))


def artifact_record(artifact: Artifact, parents: Iterable[tuple[str, str, str]]) -> dict[str, Any]:
    """What the store keeps about an artifact to rebuild its catalog rows: parents as (name, digest, role)."""
    return {
        "record": 1, "name": artifact.name, "kind": artifact.kind, "digest": artifact.digest,
        "files": artifact_manifest(artifact)["files"], "meta": artifact.meta, "provenance": artifact.provenance,
        "source": {"repo": artifact.source_repo, "revision": artifact.source_revision, "path": artifact.source_path,
                   "endpoint": artifact.source_endpoint, "ref": artifact.source_ref},
        "parents": [{"name": n, "digest": d, "role": r} for n, d, r in sorted(parents, key=lambda p: (p[2], p[0]))],
        "created_at": artifact.created_at.isoformat() + "Z",
    }


def after_commit(session: Session, key: tuple, action) -> None:
    """Run `action` once the session's transaction commits (never on rollback); a later action with the same
    key replaces an earlier one. Store records follow the catalog, so a rolled-back change writes none."""
    pending = session.info.setdefault("after_commit", {})
    if not pending:
        event.listen(session, "after_commit", _run_after_commit, once=True)
    pending[key] = action


def _run_after_commit(session: Session) -> None:
    for action in session.info.pop("after_commit", {}).values():
        try:
            action()
        except OSError as exc:  # the catalog committed: report, and let `registry fsck` find the gap
            logging.getLogger("registry").warning("could not write the artifact record to the store: %s", exc)


def _session_store(session: Session):
    """The store a Registry session carries (None for a bare session: no records are written)."""
    return session.info.get("store")


def list_artifacts(session: Session, kind: str | None = None, include_deleted: bool = False) -> list[Artifact]:
    """Artifacts, newest first, optionally of one kind."""
    query = select(Artifact).order_by(Artifact.created_at.desc(), Artifact.id.desc())
    if kind is not None:
        query = query.where(Artifact.kind == check_kind(kind))
    if not include_deleted:
        query = query.where(Artifact.status != "deleted")
    return list(session.scalars(query))


def tags_of(session: Session, artifact_id: int) -> list[str]:
    """Tag names pointing at an artifact."""
    return list(session.scalars(select(Tag.name).where(Tag.artifact_id == artifact_id).order_by(Tag.name)))


def summary(session: Session, artifact: Artifact) -> dict[str, Any]:
    """The short JSON form of an artifact, as `list --json` prints it."""
    return summary_of(artifact, len(artifact.files), tags_of(session, artifact.id))


def summary_of(a, files: int, tags: list[str]) -> dict[str, Any]:
    """summary's dict from anything with an Artifact's column attributes (an ORM object or a selected row), with
    its file count and tags given: a search builds a page of them without loading each artifact's files."""
    return {
        "id": a.id, "name": a.name, "kind": a.kind, "status": a.status, "digest": a.digest, "size": a.total_size,
        "files": files, "created_at": a.created_at.isoformat() + "Z", "tags": tags,
        "source": {"repo": a.source_repo, "revision": a.source_revision, "path": a.source_path,
                   "endpoint": a.source_endpoint, "ref": a.source_ref},
    }


def lineage(session: Session, artifact: Artifact) -> dict[str, list[dict[str, Any]]]:
    """Parents (up) and children (down) of an artifact with their roles."""
    def side(column, other):
        rows = session.execute(select(Edge.role, Artifact).join(Artifact, Artifact.id == other)
                               .where(column == artifact.id).order_by(Artifact.id)).all()
        return [{"role": role, "name": a.name, "digest": a.digest, "status": a.status} for role, a in rows]
    return {"parents": side(Edge.child_id, Edge.parent_id), "children": side(Edge.parent_id, Edge.child_id)}


def details(session: Session, artifact: Artifact) -> dict[str, Any]:
    """Everything `registry show` prints: summary, metadata, files, lineage, jobs and events."""
    events = session.scalars(select(Event).where(Event.artifact_id == artifact.id).order_by(Event.id)).all()
    job_ids = {e.job_id for e in events if e.job_id is not None}
    jobs = session.scalars(select(Job).where(or_(Job.result_artifact_id == artifact.id, Job.id.in_(job_ids)))
                           .order_by(Job.id)).all()
    return {
        **summary(session, artifact),
        "metadata": artifact.meta,
        "provenance": artifact.provenance,
        "file_list": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in artifact.files],
        "lineage": lineage(session, artifact),
        "jobs": [{"id": j.id, "type": j.type, "state": j.state,
                  "finished_at": j.finished_at and j.finished_at.isoformat() + "Z"} for j in jobs],
        "events": [{"at": e.at.isoformat() + "Z", "kind": e.kind, "job_id": e.job_id, "actor": e.actor,
                    "detail": e.detail} for e in events],
    }


def set_tag(session: Session, ref: str, tag_name: str) -> tuple[Artifact, str | None]:
    """Point a tag at an artifact, moving it if it exists; returns (artifact, previous digest)."""
    check_name(tag_name, "tag")
    artifact = resolve(session, ref)
    return artifact, tag_artifact(session, artifact, tag_name)


def tag_artifact(session: Session, artifact: Artifact, tag_name: str) -> str | None:
    """Point a tag at this artifact; returns the digest it pointed at before, if any."""
    check_tag(session, tag_name, artifact.name)
    tag = session.get(Tag, tag_name)
    previous = None
    if tag is None:
        session.add(Tag(name=tag_name, artifact_id=artifact.id))
    else:
        previous = session.get(Artifact, tag.artifact_id).digest
        tag.artifact_id, tag.updated_at = artifact.id, utcnow()
    record_event(session, "tagged", artifact.id, tag=tag_name, previous=previous)
    store = _session_store(session)
    if store is not None:
        name, digest = artifact.name, artifact.digest
        after_commit(session, ("tag", tag_name), lambda: store.records.put_tag(tag_name, name, digest))
    return previous


def remove_artifact(session: Session, ref: str, force: bool = False) -> Artifact:
    """Mark an artifact deleted and drop its files; refuses while live artifacts derive from it."""
    artifact = resolve(session, ref)
    children = session.scalars(select(Artifact).join(Edge, Edge.child_id == Artifact.id)
                               .where(Edge.parent_id == artifact.id, Artifact.status != "deleted")).all()
    if children and not force:
        names = ", ".join(sorted({c.name for c in children}))
        raise Conflict(f"{artifact.name} has derived artifacts ({names}); remove them first or use --force")
    tags = list(session.scalars(select(Tag).where(Tag.artifact_id == artifact.id)))
    for tag in tags:
        session.delete(tag)
    store = _session_store(session)
    if store is not None:
        name, tag_names = artifact.name, [t.name for t in tags]
        after_commit(session, ("artifact", name), lambda: _forget(store, name, tag_names))
    artifact.files = []
    artifact.status = "deleted"
    record_event(session, "deleted", artifact.id, name=artifact.name, digest=artifact.digest, forced=force,
                 tags=[t.name for t in tags])
    return artifact


def _forget(store, name: str, tag_names: list[str]) -> None:
    store.records.delete(name)
    for tag in tag_names:
        store.records.delete_tag(tag)


# -- lineage: adapters and their bases, `registry link` ------------------------------------------------------

LINK_ROLES = ("base", "adapter")  # the roles lineage uses: a model's base, a merged model's adapter


@dataclass
class Linked:
    """What `link` did: `changed` is False when the link already existed; `replaced` holds the removed (or, with
    --force, live) parents whose link in this role was dropped, as {name, digest, removed}."""

    child: str
    parent: str
    parent_digest: str
    role: str
    changed: bool
    replaced: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def wanted_base(meta: dict[str, Any]) -> str | None:
    """The base an adapter says it was trained on: its peft config's base_model_name_or_path."""
    return (meta.get("peft_config") or {}).get("base_model_name_or_path") or None


def find_base(session: Session, wanted: str | None) -> Artifact | None:
    """The live model a base_model_name_or_path names: by name or tag, else by source repo, else by import
    path (newest first). Import and pull link adapters with it; generate falls back to it."""
    if not wanted:
        return None
    try:
        found = resolve(session, wanted)
    except (NotFound, BadInput):
        found = None
    if found is not None and found.kind != "adapter":
        return found
    live = select(Artifact).where(Artifact.status != "deleted", Artifact.kind != "adapter").order_by(Artifact.id.desc())
    return session.scalars(live.where(Artifact.source_repo == wanted)).first() or session.scalars(
        live.where(Artifact.source_path.in_({wanted, wanted.rstrip("/")}))).first()


def linked_parent(session: Session, child: Artifact, role: str) -> Artifact | None:
    """The live parent linked to `child` in `role`, if any."""
    return session.scalars(select(Artifact).join(Edge, Edge.parent_id == Artifact.id).where(
        Edge.child_id == child.id, Edge.role == role, Artifact.status != "deleted").order_by(Artifact.id)).first()


def base_of(session: Session, adapter: Artifact) -> Artifact | None:
    """An adapter's base, as generate and merge look it up: its live `base` link, else the live model its
    base_model_name_or_path names (the lookup import and pull link with)."""
    return linked_parent(session, adapter, "base") or find_base(session, wanted_base(adapter.meta))


def trained_on(session: Session, base: Artifact, adapter: Artifact) -> bool:
    """Whether `base` is the adapter's base: it is linked to it, or its base_model_name_or_path names `base`
    (its name, a tag, its source repo or its import path), or it names nothing."""
    wanted = wanted_base(adapter.meta)
    linked = base_of(session, adapter)
    if not wanted or (linked is not None and linked.id == base.id):
        return True
    known = {base.name, base.source_repo, base.source_path, *tags_of(session, base.id)} - {None}
    return wanted.rstrip("/") in {k.rstrip("/") for k in known}


def _check_link(session: Session, child: Artifact | None, parent: Artifact, role: str) -> None:
    if role not in LINK_ROLES:
        raise BadInput(f"unknown role {role!r}; use one of: {', '.join(LINK_ROLES)}")
    if child is not None and child.id == parent.id:
        raise BadInput(f"cannot link {child.name} to itself")
    if parent.status == "deleted":
        raise Conflict(f"{parent.name} ({parent.digest[:19]}) was removed; link to a live artifact")
    if role == "adapter" and (parent.kind != "adapter" or (child is not None and child.kind != "merged")):
        raise BadInput(f"role adapter links a merged model to the adapter merged into it; {parent.name} is a "
                       f"{parent.kind}{'' if child is None else f' and {child.name} a {child.kind}'}")
    if role == "base" and parent.kind == "adapter":
        raise BadInput(f"{parent.name} is an adapter, not a base model; name the model it was trained on (or "
                       "--role adapter for a merged model's adapter)")
    if child is None:
        return
    if child.status == "deleted":
        raise Conflict(f"{child.name} was removed; nothing was linked")
    seen, frontier = {parent.id}, [parent.id]
    while frontier:  # the parent's ancestors: the child among them would close a cycle
        frontier = [p for p in session.scalars(select(Edge.parent_id).where(Edge.child_id.in_(frontier)))
                    if p not in seen]
        if child.id in frontier:
            raise BadInput(f"{parent.name} derives from {child.name}; linking {child.name} to it would make a cycle")
        seen.update(frontier)


def link(session: Session, child: Artifact, parent: Artifact, role: str = "base", force: bool = False,
         job_id: int | None = None) -> Linked:
    """Record that `child` derives from `parent` in `role` (event `linked`; the child's record follows).

    A child has one parent per role. A link that exists already is a no-op; a link in this role to a removed
    artifact is replaced (how a re-imported base is linked again); a live one only with `force`.
    """
    _check_link(session, child, parent, role)
    current = session.execute(select(Edge, Artifact).join(Artifact, Artifact.id == Edge.parent_id)
                              .where(Edge.child_id == child.id, Edge.role == role)).all()
    if any(edge.parent_id == parent.id for edge, _ in current):
        return Linked(child.name, parent.name, parent.digest, role, False, [])
    live = [a for _, a in current if a.status != "deleted"]
    if live and not force:
        raise Conflict(f"{child.name} is already linked to {role} {live[0].name} ({live[0].digest[:19]}); to "
                       f"replace it: registry link {child.name} {parent.name} --role {role} --force")
    replaced = [{"name": a.name, "digest": a.digest, "removed": a.status == "deleted"} for _, a in current]
    for edge, _ in current:
        session.delete(edge)
    session.add(Edge(child_id=child.id, parent_id=parent.id, role=role))
    session.flush()
    record_event(session, "linked", child.id, job_id, parent=parent.name, parent_digest=parent.digest, role=role,
                 replaced=replaced)
    _rewrite_record(session, child)
    return Linked(child.name, parent.name, parent.digest, role, True, replaced)


def _rewrite_record(session: Session, artifact: Artifact) -> None:
    """Write the artifact's record again with its current parents, so `fsck --rebuild-catalog` restores them."""
    store = _session_store(session)
    if store is None:
        return
    rows = session.execute(select(Edge.role, Artifact.name, Artifact.digest)
                           .join(Artifact, Artifact.id == Edge.parent_id).where(Edge.child_id == artifact.id)).all()
    record = artifact_record(artifact, [(name, digest, role) for role, name, digest in rows])
    after_commit(session, ("artifact", artifact.name), lambda: store.records.put(record))


def add_provenance(session: Session, artifact: Artifact, extra: dict[str, Any]) -> None:
    """Merge `extra` into an artifact's provenance (e.g. the evaluation a later run made of the same content, which
    the no-op registration would drop) and write its record again. The digest covers kind and files only."""
    artifact.provenance = {**(artifact.provenance or {}), **extra}
    _rewrite_record(session, artifact)


def register_with_base(session: Session, store: BlobStore, *, base: Artifact | None = None,
                       job_id: int | None = None, **fields: Any) -> tuple[Artifact, bool, Linked | None]:
    """register_artifact for import and pull, which link an adapter to its base the same way: to `base`
    (import --base), else to the live model its base_model_name_or_path names (find_base).

    Registering an artifact that exists already repairs its lineage: an explicit `base` is linked (replacing
    a link to a removed base; a different live one is refused), and a detected base is linked when the
    artifact has no live base. Returns (artifact, created, the link made on an existing artifact or None).
    """
    parent = base
    if parent is None and fields["kind"] == "adapter":
        parent = find_base(session, wanted_base(fields["meta"]))
    if parent is not None:
        _check_link(session, None, parent, "base")
    artifact, created = register_artifact(session, store, parents=[(parent, "base")] if parent else [],
                                          job_id=job_id, **fields)
    linked = None
    if not created and parent is not None and parent.id != artifact.id and (
            base is not None or linked_parent(session, artifact, "base") is None):
        linked = link(session, artifact, parent, "base", job_id=job_id)
    return artifact, created, linked if linked is not None and linked.changed else None
