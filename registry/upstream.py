"""`registry verify --upstream`: compare a pulled artifact with the hub's digests for its pinned commit."""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any

from . import hub
from .catalog import list_artifacts, resolve
from .config import WorkerConfig, load_worker_config
from .core import Registry
from .errors import BadInput, OperationFailed, RegistryError
from .models import Artifact


@dataclass
class UpstreamCheck:
    """Per-file comparison with the hub, and whether the requested branch has moved on.

    `skipped` (not pulled from a hub) and `error` (the hub could not be asked) are set only by check_all.
    """

    name: str
    repo_id: str | None = None
    commit: str | None = None
    ref: str | None = None
    ref_now: str | None = None
    ok: bool = True
    files: list[dict[str, Any]] = field(default_factory=list)
    endpoint: str | None = None
    # given (--endpoint), recorded (where it was pulled from, or HF_ENDPOINT at an --hf-cache import), or
    # default (none recorded: this host's HF_ENDPOINT, else the public hub)
    endpoint_source: str | None = None
    skipped: str | None = None
    error: str | None = None

    @property
    def moved(self) -> bool:
        return bool(self.ref_now and self.ref_now != self.commit)

    @property
    def status(self) -> str:
        return "skipped" if self.skipped else "error" if self.error else "ok" if self.ok else "differs"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "moved": self.moved, "status": self.status}


def check_upstream(reg: Registry, ref: str, endpoint: str | None = None,
                   config: WorkerConfig | None = None) -> UpstreamCheck:
    """Re-check local files against the hub's hashes at the pinned commit; reads only non-LFS blobs.

    The hub asked is `endpoint`, else the one stored at pull time. A token goes only where this process's
    rules allow (hub.token_for): an endpoint stored in the catalog is not trusted because it is stored there.
    """
    _require_online()
    with reg.session() as s:
        a = resolve(s, ref)
        if not a.source_repo or not a.source_revision:
            raise BadInput(f"{a.name} was not pulled from a hub; --upstream needs a pulled artifact")
        pinned = _Pinned.of(a)
    return _check(reg, pinned, endpoint, config or load_worker_config(reg.home))


def check_all(reg: Registry, endpoint: str | None = None, config: WorkerConfig | None = None) -> list[UpstreamCheck]:
    """check_upstream for every live artifact with a source repo and commit; the others are listed as skipped,
    and an artifact whose hub cannot be asked is listed with its error (neither stops the others)."""
    _require_online()
    config = config or load_worker_config(reg.home)
    with reg.session() as s:
        artifacts = sorted(list_artifacts(s), key=lambda a: a.name)
        pinned = [_Pinned.of(a) if a.source_repo and a.source_revision else a.name for a in artifacts]
    checks = []
    for p in pinned:
        if isinstance(p, str):
            checks.append(UpstreamCheck(p, skipped="not pulled from a hub (no source repo and commit)"))
            continue
        try:
            checks.append(_check(reg, p, endpoint, config))
        except RegistryError as exc:
            checks.append(UpstreamCheck(p.name, p.repo_id, p.commit, p.asked, ok=False, error=str(exc)))
    return checks


@dataclass
class _Pinned:
    """What check_upstream needs of an artifact, read inside one session."""

    name: str
    repo_id: str
    commit: str
    asked: str | None
    endpoint: str | None
    local: dict[str, tuple[str, int]]

    @classmethod
    def of(cls, a: Artifact) -> "_Pinned":
        return cls(a.name, a.source_repo, a.source_revision, a.source_ref, a.source_endpoint,
                   {f.path: (f.sha256, f.size) for f in a.files})


def _require_online() -> None:
    if hub.offline():
        raise OperationFailed("HF_HUB_OFFLINE is set: verify --upstream asks the hub, so it cannot run offline; "
                              "unset HF_HUB_OFFLINE, or run registry verify (local hashes only)")


def _check(reg: Registry, p: _Pinned, endpoint: str | None, config: WorkerConfig) -> UpstreamCheck:
    url = hub.endpoint_url(endpoint or p.endpoint)
    source = "given" if endpoint else "recorded" if p.endpoint else "default"
    token = hub.token_for(config, url, refuse_untrusted=False)
    try:
        # The commit (or branch) first: that call fails at once on an unreachable hub, where the tree listing
        # (huggingface_hub retries it with backoff) would keep trying for about 24 s.
        resolved = hub.resolve_commit(url, p.repo_id, p.asked or p.commit, token)
        ref_now = resolved if p.asked and p.asked != p.commit else None
        remote = {f.path: f for f in hub.list_files(url, p.repo_id, p.commit, token)}
    except hub.AccessDenied as exc:
        if token is None and not hub.is_trusted(config, url):
            raise hub.AccessDenied(f"{exc}. No token was sent: {url} is not a trusted endpoint; to trust it for "
                                   f"this command pass --endpoint {url} (with --token-file), or add it to "
                                   f"{config.path}") from None
        raise
    except RegistryError as exc:
        if source != "default":
            raise
        raise type(exc)(f"{exc}; {p.name} records no endpoint (an --hf-cache import made without HF_ENDPOINT), so "
                        f"{url} was asked: pass --endpoint URL to ask the mirror it came from") from None
    files = [_compare(reg, path, p.local.get(path), remote.get(path)) for path in sorted(set(p.local) | set(remote))]
    ok = all(f["status"] == "ok" for f in files if f["status"] != "not pulled")
    return UpstreamCheck(p.name, p.repo_id, p.commit, p.asked, ref_now, ok, files, url, source)


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
