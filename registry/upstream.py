"""`registry verify --upstream`: compare a pulled artifact with the hub's digests for its pinned commit."""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any

from . import hub
from .catalog import resolve
from .core import Registry
from .errors import BadInput


@dataclass
class UpstreamCheck:
    """Per-file comparison with the hub, and whether the requested branch has moved on."""

    name: str
    repo_id: str
    commit: str
    ref: str | None
    ref_now: str | None
    ok: bool
    files: list[dict[str, Any]] = field(default_factory=list)

    @property
    def moved(self) -> bool:
        return bool(self.ref_now and self.ref_now != self.commit)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "moved": self.moved}


def check_upstream(reg: Registry, ref: str, token: str | None, endpoint: str | None = None) -> UpstreamCheck:
    """Re-check local files against the hub's hashes at the pinned commit; reads only non-LFS blobs."""
    with reg.session() as s:
        a = resolve(s, ref)
        if not a.source_repo or not a.source_revision:
            raise BadInput(f"{a.name} was not pulled from a hub; --upstream needs a pulled artifact")
        name, repo_id, commit, asked = a.name, a.source_repo, a.source_revision, a.source_ref
        local = {f.path: (f.sha256, f.size) for f in a.files}
        endpoint = hub.endpoint_url(endpoint or a.source_endpoint)
    remote = {f.path: f for f in hub.list_files(endpoint, repo_id, commit, token)}
    files = [_compare(reg, path, local.get(path), remote.get(path)) for path in sorted(set(local) | set(remote))]
    ref_now = hub.resolve_commit(endpoint, repo_id, asked, token) if asked and asked != commit else None
    ok = all(f["status"] == "ok" for f in files if f["status"] != "not pulled")
    return UpstreamCheck(name, repo_id, commit, asked, ref_now, ok, files)


def _compare(reg: Registry, path: str, local: tuple[str, int] | None, remote: hub.RemoteFile | None) -> dict:
    if remote is None:
        return {"path": path, "status": "not upstream"}
    if local is None:
        return {"path": path, "status": "not pulled"}
    sha256, size = local
    if remote.sha256:
        status = "ok" if remote.sha256 == sha256 and remote.size == size else "mismatch"
        return {"path": path, "status": status, "expected": remote.sha256, "actual": sha256}
    blob = reg.store.path(sha256)
    if not blob.is_file():
        return {"path": path, "status": "missing"}
    git = hashlib.sha1(f"blob {blob.stat().st_size}\0".encode())
    git.update(blob.read_bytes())
    actual = git.hexdigest()
    return {"path": path, "status": "ok" if actual == remote.git_sha1 else "mismatch",
            "expected": remote.git_sha1, "actual": actual}
