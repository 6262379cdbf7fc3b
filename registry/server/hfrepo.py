"""The catalog as Hugging Face Hub repos: plain lookups on a catalog session, no web framework (hf.py serves them).

A repo id is an artifact's name (one or two path segments). Its revisions: `main`, the live artifact with that
name; any other name R, the tag `{repo_id}:{R}` (so the tag `acme/llama:prod` is revision `prod` of
`acme/llama`); and a 40-hex commit id, `digest[7:47]`, of any artifact reachable from the repo id (the named one
and the targets of its `{repo_id}:*` tags). A commit id is derived from the content digest, so the same commit
always lists the same files, which is what HF clients assume when they cache a tree by commit.

Every file is presented as a Git LFS file: its `oid` is the git blob id of its LFS pointer text and `lfs.oid`
its sha256, so clients name their cached blobs by the registry's own digest and never need a git blob id of the
content (which the catalog only knows for small files).
"""
from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from ..catalog import NAME_RE, require_usable
from ..errors import NotFound, OperationFailed
from ..models import Artifact, Blob, File, Tag

COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
SHORT_COMMIT_RE = re.compile(r"^[0-9a-f]{7,39}$")  # an abbreviated commit id, as git and the Hub accept
NAME_CHARS_RE = re.compile(r"^[A-Za-z0-9._\-/:@+]*$")  # the characters catalog.NAME_RE allows in a name
MAX_PATH = 1024  # files.path's column length: a longer path cannot be in the catalog
PAGE_SIZE = 1000  # tree entries and listed models per page (the Hub's own page size)


class RepoNotFound(NotFound):
    """No live artifact and no `{repo_id}:*` tag: HF clients raise RepositoryNotFoundError."""

    hf_code = "RepoNotFound"


class RevisionNotFound(NotFound):
    """The repo exists but not this revision: RevisionNotFoundError."""

    hf_code = "RevisionNotFound"


class EntryNotFound(NotFound):
    """No such file at this revision: EntryNotFoundError. `commit` (when known) lets clients cache the absence."""

    hf_code = "EntryNotFound"

    def __init__(self, message: str, commit: str | None = None):
        super().__init__(message)
        self.commit = commit


class NotServable(OperationFailed):
    """The artifact is known to be damaged, or a blob changed on disk since it was verified: refused (409)."""

    hf_code = None


def commit_of(artifact: Artifact) -> str:
    """The artifact's stable HF commit id: the first 40 hex digits of its content digest."""
    return artifact.digest[7:47]


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The Git LFS pointer text the Hub would store in git for a file with this content."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def git_blob_id(data: bytes) -> str:
    """Git's blob id of `data`: sha1 of "blob <len>\\0" + data."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class RepoFile:
    """One file of a revision, as the catalog lists it."""

    path: str
    size: int
    sha256: str

    @property
    def pointer_size(self) -> int:
        return len(lfs_pointer(self.sha256, self.size))

    @property
    def oid(self) -> str:
        """The git blob id the Hub lists for an LFS file: that of its pointer text."""
        return git_blob_id(lfs_pointer(self.sha256, self.size))

    def lfs(self, key: str = "oid") -> dict[str, Any]:
        """The `lfs` object: the tree endpoint names the digest `oid`, model info `sha256`."""
        return {key: self.sha256, "size": self.size, "pointerSize": self.pointer_size}


@dataclass(frozen=True)
class RepoRevision:
    """A revision of a repo, resolved to one artifact, with everything the endpoint needs after the session."""

    repo_id: str
    revision: str  # as asked: main, a tag's suffix, or a commit id
    artifact_id: int
    name: str  # the artifact's own name (differs from repo_id for a tag revision)
    kind: str
    status: str
    digest: str
    commit: str
    created_at: datetime
    meta: dict[str, Any]
    files: tuple[RepoFile, ...]

    def file(self, path: str) -> RepoFile:
        """The file at exactly this path, or EntryNotFound (carrying the commit)."""
        for f in self.files:
            if f.path == path:
                return f
        raise EntryNotFound(f"{path} is not a file of {self.repo_id} at {self.revision}", self.commit)

    def check_servable(self) -> None:
        """Refuse an artifact that verify or a pull left corrupt or incomplete, saying what to run (the check
        every command that uses an artifact makes), as a 409 of the HF endpoint."""
        try:
            require_usable(self)
        except OperationFailed as exc:
            raise NotServable(str(exc)) from None


# -- checking what a request names, before any query -------------------------------------------------------

def check_repo_id(repo_id: str) -> str:
    """A repo id is one or two artifact-name segments; anything else cannot name an artifact (RepoNotFound)."""
    parts = repo_id.split("/")
    if (not 1 <= len(parts) <= 2 or len(repo_id) > 255 or ".." in repo_id
            or not all(NAME_RE.match(p) for p in parts)):
        raise RepoNotFound(f"no repo {_printable(repo_id)}: a repo id is an artifact name such as acme/llama")
    return repo_id


def check_revision(repo_id: str, revision: str) -> str:
    """A revision is main, a commit id or a tag suffix: a valid tag name once prefixed with `{repo_id}:`."""
    tag = f"{repo_id}:{revision}"
    if not revision or len(tag) > 255 or ".." in revision or not NAME_RE.match(tag):
        raise RevisionNotFound(f"no revision {_printable(revision)} of {repo_id}: use main, a tag or a commit id")
    return revision


def check_file_path(path: str) -> str:
    """A file path is relative, without `.`/`..` segments, backslashes or control characters (imports refuse
    such names, so none is in the catalog); checked before any query so odd bytes never reach the database."""
    parts = path.split("/")
    if (not path or len(path) > MAX_PATH or path.startswith("/") or "\\" in path
            or any(p in ("", ".", "..") for p in parts)
            or any(unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp") for c in path)):
        raise EntryNotFound(f"no file {_printable(path)}: paths are relative, without '..', '.' or backslashes")
    return path


def _printable(text: str) -> str:
    """A name from a request in double quotes, safe for a one-line message and an HTTP header: characters
    that are not printable ASCII as Python escapes (\\x00, \\xe9, \\udcff); backslashes stay single, so the
    message says what was asked even once JSON escapes it again."""
    shown = text if len(text) <= 120 else text[:117] + "..."
    return '"' + "".join(c if " " <= c <= "~" else c.encode("unicode_escape").decode("ascii") for c in shown) + '"'


# -- resolving ----------------------------------------------------------------------------------------------

def named(session: Session, repo_id: str) -> Artifact | None:
    """The live artifact named `repo_id` (what revision main is)."""
    return session.scalars(select(Artifact).where(Artifact.name == repo_id, Artifact.status != "deleted")).first()


def repo_tags(session: Session, repo_id: str) -> list[tuple[str, Artifact]]:
    """(revision, artifact) for each tag `{repo_id}:{revision}`, by revision."""
    rows = session.execute(select(Tag.name, Artifact).join(Artifact, Artifact.id == Tag.artifact_id)
                           .where(Tag.name.startswith(f"{repo_id}:", autoescape=True)).order_by(Tag.name)).all()
    return [(name[len(repo_id) + 1:], artifact) for name, artifact in rows if artifact.status != "deleted"]


def resolve_artifact(session: Session, repo_id: str, revision: str) -> Artifact:
    """The live artifact a repo revision names, or RepoNotFound / RevisionNotFound."""
    check_repo_id(repo_id)
    check_revision(repo_id, revision)
    main = named(session, repo_id)
    if revision == "main" and main is not None:
        return main
    if COMMIT_RE.match(revision.lower()):
        commit = revision.lower()
        if main is not None and commit_of(main) == commit:
            return main
        tagged = repo_tags(session, repo_id)
        found = next((a for _, a in tagged if commit_of(a) == commit), None)
        if found is not None:
            return found
        _check_repo_exists(main, tagged, repo_id)
        raise RevisionNotFound(f"no commit {commit} in {repo_id}: it is none of its artifact's or tags' commits")
    tag = session.get(Tag, f"{repo_id}:{revision}")
    if tag is not None:
        artifact = session.get(Artifact, tag.artifact_id)
        if artifact is not None and artifact.status != "deleted":
            return artifact
    tagged = repo_tags(session, repo_id)
    if SHORT_COMMIT_RE.match(revision):  # not a tag: an abbreviated commit id, as on the Hub
        return _by_commit_prefix(main, tagged, repo_id, revision)
    _check_repo_exists(main, tagged, repo_id)
    raise RevisionNotFound(f"no revision {_printable(revision)} of {repo_id}: no tag {repo_id}:{revision}"
                           if revision != "main" else f"{repo_id} has no main: no live artifact has that name; "
                           f"its revisions are its tags {repo_id}:*")


def _by_commit_prefix(main: Artifact | None, tagged: list[tuple[str, Artifact]], repo_id: str,
                      prefix: str) -> Artifact:
    """The one artifact reachable from the repo id whose commit starts with `prefix`."""
    reachable = {a.id: a for a in ([main] if main is not None else []) + [a for _, a in tagged]}
    found = [a for a in reachable.values() if commit_of(a).startswith(prefix)]
    if len(found) == 1:
        return found[0]
    _check_repo_exists(main, tagged, repo_id)
    if found:
        raise RevisionNotFound(f"revision {prefix} of {repo_id} is ambiguous: it starts the commits "
                               f"{', '.join(sorted(commit_of(a) for a in found))}; give more digits")
    raise RevisionNotFound(f"no revision {prefix} of {repo_id}: no tag {repo_id}:{prefix}, and none of its "
                           f"artifact's or tags' commits starts with it")


def _check_repo_exists(main: Artifact | None, tagged: list | None, repo_id: str) -> None:
    if main is None and not tagged:
        raise RepoNotFound(f"no repo {repo_id}: no artifact has that name and no tag starts with {repo_id}:")


def resolve_revision(session: Session, repo_id: str, revision: str) -> RepoRevision:
    """A repo revision with its files, loaded in this session (usable after it closes)."""
    artifact = resolve_artifact(session, repo_id, revision)
    files = session.execute(select(File.path, File.size, File.sha256).where(File.artifact_id == artifact.id)
                            .order_by(File.path)).all()
    return RepoRevision(repo_id=repo_id, revision=revision, artifact_id=artifact.id, name=artifact.name,
                        kind=artifact.kind, status=artifact.status, digest=artifact.digest,
                        commit=commit_of(artifact), created_at=artifact.created_at, meta=dict(artifact.meta or {}),
                        files=tuple(RepoFile(p, s, h) for p, s, h in files))


# -- what the Hub's JSON looks like ----------------------------------------------------------------------

def hub_time(at: datetime) -> str:
    """The Hub's timestamp format: ISO 8601 UTC with milliseconds and Z."""
    return at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"


def tags_for(kind: str, meta: dict[str, Any]) -> list[str]:
    """The Hub `tags` of an artifact: its kind and, when known, its model type."""
    tags = [kind]
    if isinstance(meta.get("model_type"), str):
        tags.append(meta["model_type"])
    return tags


# The Hub's library_name: what loads the files (a GGUF repo's is "gguf": llama.cpp and Ollama, not transformers).
LIBRARY_NAMES = {"adapter": "peft", "gguf": "gguf"}


def model_info(rev: RepoRevision) -> dict[str, Any]:
    """The ModelInfo JSON of `GET /api/models/{repo_id}[/revision/{rev}]` (with file sizes and LFS digests)."""
    author = rev.repo_id.split("/")[0] if "/" in rev.repo_id else None
    return {
        "_id": rev.digest, "id": rev.repo_id, "modelId": rev.repo_id, "author": author, "sha": rev.commit,
        "lastModified": hub_time(rev.created_at), "createdAt": hub_time(rev.created_at),
        "private": False, "gated": False, "disabled": False, "downloads": 0, "likes": 0,
        "tags": tags_for(rev.kind, rev.meta), "library_name": LIBRARY_NAMES.get(rev.kind, "transformers"),
        "usedStorage": sum(f.size for f in rev.files),
        "siblings": [{"rfilename": f.path, "size": f.size, "blobId": f.oid, "lfs": f.lfs("sha256")}
                     for f in rev.files],
        "registry": {"name": rev.name, "kind": rev.kind, "digest": rev.digest, "status": rev.status},
        **({"gguf": gguf_info(rev.meta)} if rev.kind == "gguf" else {}),
    }


def gguf_info(meta: dict[str, Any]) -> dict[str, Any]:
    """The Hub's `gguf` field of a GGUF repo's model info (huggingface_hub ModelInfo.gguf): the parameter count
    as `total`, and what the file's header says; keys the header lacks are left out, as the Hub does."""
    g = meta.get("gguf") or {}
    info = {"total": g.get("parameter_count"), "architecture": g.get("architecture"),
            "context_length": g.get("context_length"), "chat_template": g.get("chat_template"),
            "bos_token": g.get("bos_token"), "eos_token": g.get("eos_token")}
    return {k: v for k, v in info.items() if v is not None}


def tree(rev: RepoRevision, path: str, recursive: bool, expand: bool = False) -> list[dict[str, Any]]:
    """Entries of `GET /api/models/{repo}/tree/{rev}[/{path}]`: files and folders under `path` ("" the root),
    every folder level when `recursive`, else only the direct children. EntryNotFound when `path` is no folder."""
    prefix = f"{path}/" if path else ""
    under = [f for f in rev.files if f.path.startswith(prefix)]
    if path and not under:
        raise EntryNotFound(f"no folder {path} in {rev.repo_id} at {rev.revision}", rev.commit)
    entries: dict[str, dict[str, Any]] = {}
    for f in under:
        rel = f.path[len(prefix):].split("/")
        depth = len(rel) if recursive else 1
        for i in range(1, min(depth, len(rel) - 1) + 1):  # the folders on the way to the file
            folder = prefix + "/".join(rel[:i])
            entries.setdefault(folder, {"type": "directory", "oid": _folder_oid(rev.commit, folder), "size": 0,
                                        "path": folder})
        if recursive or len(rel) == 1:
            entry = {"type": "file", "oid": f.oid, "size": f.size, "path": f.path, "lfs": f.lfs("oid")}
            if expand:
                entry["lastCommit"] = {"id": rev.commit, "title": f"registry: {rev.name}",
                                       "date": hub_time(rev.created_at)}
            entries[f.path] = entry
    return sorted(entries.values(), key=lambda e: (e["type"] != "directory", e["path"]))


def _folder_oid(commit: str, folder: str) -> str:
    """A stable 40-hex id for a folder of a commit (HF clients only need one to be there)."""
    return hashlib.sha1(f"tree {commit} {folder}".encode()).hexdigest()


def refs(session: Session, repo_id: str) -> dict[str, Any]:
    """`GET /api/models/{repo}/refs`: main as the one branch, the repo's tags as tags."""
    check_repo_id(repo_id)
    main = named(session, repo_id)
    tagged = repo_tags(session, repo_id)
    _check_repo_exists(main, tagged, repo_id)
    branches = [{"name": "main", "ref": "refs/heads/main", "targetCommit": commit_of(main)}] if main else []
    return {"branches": branches, "converts": [], "pullRequests": [],
            "tags": [{"name": rev, "ref": f"refs/tags/{rev}", "targetCommit": commit_of(a)} for rev, a in tagged]}


def list_models(session: Session, search: str | None = None, author: str | None = None,
                kinds: list[str] | None = None, sort: str | None = None, descending: bool = True,
                offset: int = 0, limit: int = PAGE_SIZE, full: bool = False) -> tuple[list[dict[str, Any]], bool]:
    """A page of `GET /api/models`: live artifacts as Hub model entries; returns (items, more pages follow).

    `search` is a case-insensitive substring of the name, `author` its first segment, `kinds` the kinds to keep
    (the Hub's `filter`); sorted by name, or newest first for sort=lastModified/createdAt."""
    if any(text and not NAME_CHARS_RE.match(text) for text in (search, author)):
        return [], False  # a character no name can hold (a NUL would even fail the query on PostgreSQL)
    query = select(Artifact).where(Artifact.status != "deleted")
    if search:
        query = query.where(func.lower(Artifact.name).contains(search.lower(), autoescape=True))
    if author:
        query = query.where(Artifact.name.startswith(f"{author}/", autoescape=True))
    if kinds:
        query = query.where(Artifact.kind.in_(kinds))
    if sort in ("lastModified", "createdAt", "last_modified", "created_at"):
        order = (Artifact.created_at.desc(), Artifact.id.desc()) if descending else (Artifact.created_at,
                                                                                         Artifact.id)
    else:
        order = (Artifact.name, Artifact.id)
    if full:
        query = query.options(selectinload(Artifact.files))
    rows = list(session.scalars(query.order_by(*order).offset(offset).limit(limit + 1)))
    items = []
    for a in rows[:limit]:
        item = {"_id": a.digest, "id": a.name, "modelId": a.name, "sha": commit_of(a),
                "lastModified": hub_time(a.created_at), "createdAt": hub_time(a.created_at), "private": False,
                "downloads": 0, "likes": 0, "tags": tags_for(a.kind, a.meta or {})}
        if "/" in a.name:
            item["author"] = a.name.split("/")[0]
        if full:
            item["siblings"] = [{"rfilename": f.path} for f in a.files]
        items.append(item)
    return items, len(rows) > limit


# -- the bytes ---------------------------------------------------------------------------------------------

def blob_row(session: Session, sha256: str) -> Blob | None:
    return session.get(Blob, sha256)


def open_blob(store_path: Path, rev: RepoRevision, f: RepoFile, blob: Blob | None) -> tuple[BinaryIO, int]:
    """Open a file's blob for serving, after checking it is the file that was verified: present, of the
    catalog's size and, where the catalog has its stat stamp, with the same size, mtime and inode. The checks
    are made on the opened file (fstat), so the bytes sent are those of the file checked.
    Returns (the open file, its size); NotServable says why not and what to run."""
    rev.check_servable()
    try:
        handle = open(store_path, "rb", buffering=0)
    except FileNotFoundError:
        raise NotServable(f"{f.path} of {rev.name} is missing from the store; not serving it: run `registry "
                          f"verify {rev.name}`, then `registry repair {rev.name}`") from None
    st = os.fstat(handle.fileno())
    stamp_known = blob is not None and blob.stat_mtime_ns is not None
    changed = st.st_size != f.size or (stamp_known and (st.st_size, st.st_mtime_ns, st.st_ino)
                                       != (blob.stat_size, blob.stat_mtime_ns, blob.stat_inode))
    if changed:
        handle.close()
        why = f"its size is {st.st_size}, not {f.size}" if st.st_size != f.size else "its mtime or inode changed"
        raise NotServable(f"{f.path} of {rev.name} changed on disk since it was verified ({why}); not serving it: "
                          f"run `registry verify {rev.name}` (and `registry repair {rev.name}` if it finds damage)")
    return handle, st.st_size

