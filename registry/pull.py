"""`registry pull`: download a hub commit into the store, checking each file against the hub's digests
in the same pass that writes it, resuming partial files, and skipping content the store already has."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import socket
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Iterator

import httpx
from sqlalchemy import or_, select

from . import hub
from .catalog import check_new_name, check_tag, name_available, register_with_base, tag_artifact
from .core import Registry
from .errors import DiskFull, NotFound, OperationFailed
from .folder import checked_kind, read_metadata
from .gclock import register_retrying, release_pins
from .manifest import build_manifest, manifest_digest
from .models import Artifact, Blob, Tag
from .progress import NullReporter, Reporter
from .store import CHUNK, Ingested, write_all

MAX_RECONNECTS = 8
POLL_SECONDS = 0.2  # how often a pull looks whether its job must stop, however slowly bytes arrive


@dataclass
class PullResult:
    """What a pull did: the artifact, and how many bytes and files crossed the network."""

    artifact_id: int
    name: str
    digest: str
    kind: str
    repo_id: str
    commit: str
    tag: str | None  # REPO_ID:REVISION; None for a filtered pull (it never takes the repo's tags)
    files: int
    size: int
    created: bool
    files_downloaded: int
    bytes_downloaded: int
    bytes_reread: int
    warnings: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)  # every tag this pull pointed at the artifact
    pull_filter: dict[str, list[str]] | None = None  # {include, exclude} of a filtered pull
    linked: dict[str, Any] | None = None  # a base link this pull added to an adapter registered before

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Downloader:
    """Fetches files of one commit into the store; safe to call from several threads."""

    def __init__(self, reg: Registry, endpoint: str, repo_id: str, commit: str, token: str | None,
                 reporter: Reporter):
        self.reg, self.endpoint, self.repo_id, self.commit = reg, endpoint, repo_id, commit
        self.reporter = reporter
        headers = {"user-agent": "registry/0.1"}
        self.token_sent = bool(token)
        if token:
            headers["authorization"] = f"Bearer {token}"
        self.client = httpx.Client(follow_redirects=True, headers=headers,
                                   timeout=httpx.Timeout(30.0, read=60.0))
        self.bytes_downloaded = 0
        self.bytes_reread = 0
        # abort() sets this and cuts the connections being read, so a stopped pull does not wait for a slow or
        # stalled server to send its next byte (the reporter's stop check only runs when bytes arrive).
        self.aborted = threading.Event()
        self._reading: set[httpx.Response] = set()
        self._lock = threading.Lock()

    def close(self) -> None:
        self.client.close()

    def abort(self) -> None:
        """Stop every download of this pull now: blocked reads fail at once, and no new request starts."""
        self.aborted.set()
        with self._lock:
            reading = list(self._reading)
        for resp in reading:
            _cut(resp)

    def _check_aborted(self) -> None:
        if self.aborted.is_set():
            raise _Aborted()

    def existing(self, f: hub.RemoteFile) -> Ingested | None:
        """The store's blob for this file when its content is already there (no transfer needed)."""
        sha = f.sha256
        if sha is None:
            with self.reg.read_session() as s:
                sha = s.scalars(select(Blob.sha256).where(Blob.git_sha1 == f.git_sha1)
                                .order_by(Blob.sha256)).first()
        found = self.reg.store.reuse(sha, f.size) if sha is not None else None  # pinned: gc leaves it alone
        return dataclasses.replace(found, git_sha1=f.git_sha1) if found is not None else None

    def fetch(self, f: hub.RemoteFile, replace: bool = False) -> Ingested:
        """Download one file (resuming a partial one), verify it, and publish it into the store.

        With `replace` (repair), the verified download goes over a damaged blob file of the same digest."""
        self._check_aborted()
        with self.reg.store.partial(f.key) as part:  # a second process pulling the same content waits here
            fh = part.file
            found = None if replace else self.existing(f)
            if found is not None:
                return found
            handle = self.reporter.file_started(f.path, f.size)
            try:
                sha256 = self._download_verified(f, fh, handle)
                published = part.publish(sha256, f.size, replace=replace)
            except DiskFull:  # say what filled the disk (our partials) and that a rerun resumes them
                raise self.reg.store.disk_full_while_downloading(f.path) from None
            finally:
                self.reporter.file_finished(handle)
            return dataclasses.replace(published, git_sha1=f.git_sha1)

    def _download_verified(self, f: hub.RemoteFile, fh: BinaryIO, handle: object) -> str:
        for attempt in (1, 2):  # content that does not match is fetched once more from scratch
            sha256, sha1 = self._download(f, fh, handle)
            actual, expected = (sha256, f.sha256) if f.sha256 else (sha1, f.git_sha1)
            if actual == expected:
                return sha256
            fh.truncate(0)
        digest = "sha256" if f.sha256 else "git blob sha1"
        raise OperationFailed(f"{f.path}: downloaded content does not match the hub ({digest} expected "
                              f"{expected}, got {actual}); nothing was registered")

    def _download(self, f: hub.RemoteFile, fh: BinaryIO, handle: object) -> tuple[str, str]:
        sha256, sha1 = _hashers(f)
        offset = fh.seek(0, os.SEEK_END)
        if offset > f.size:
            fh.truncate(0)
            offset = 0
        if offset:  # resuming: hash what is already on disk (the only bytes ever read back)
            fh.seek(0)
            for chunk in iter(lambda: fh.read(CHUNK), b""):
                sha256.update(chunk)
                sha1.update(chunk)
            self.bytes_reread += offset
            self.reporter.advance(offset)
        if offset == f.size:  # a complete partial (killed before it was published): no request is needed,
            if (sha256.hexdigest() == f.sha256) if f.sha256 else (sha1.hexdigest() == f.git_sha1):
                return sha256.hexdigest(), sha1.hexdigest()  # and a Range request for 0 bytes gets a 416
            fh.truncate(0)  # full size but not the hub's content: download it again from the start
            offset = 0
            sha256, sha1 = _hashers(f)
        url = hub.file_url(self.endpoint, self.repo_id, self.commit, f.path)
        failures = 0
        while True:
            try:
                offset = self._stream(url, f, fh, offset, sha256, sha1, handle)
                if offset >= f.size:
                    return sha256.hexdigest(), sha1.hexdigest()
                raise httpx.RemoteProtocolError(f"server closed the connection at byte {offset} of {f.size}")
            except _RangeIgnored:  # the server sent the whole file: start over with fresh digests
                fh.truncate(0)
                offset = 0
                sha256, sha1 = _hashers(f)
            except httpx.TransportError as exc:
                self._check_aborted()  # our own abort() cut the connection: no reconnect
                failures += 1
                if failures > MAX_RECONNECTS:
                    raise OperationFailed(f"{f.path}: the connection kept dropping ({exc}); run the pull again "
                                          "to resume from the bytes already downloaded") from None
                self.aborted.wait(min(0.1 * 2 ** failures, 5.0))
                self._check_aborted()
                offset = fh.seek(0, os.SEEK_END)

    def _stream(self, url: str, f: hub.RemoteFile, fh: BinaryIO, offset: int, sha256, sha1,
                handle: object) -> int:
        headers = {"range": f"bytes={offset}-"} if offset else {}
        self._check_aborted()
        with self.client.stream("GET", url, headers=headers) as resp, self._being_read(resp):
            if resp.status_code >= 400:
                raise hub.http_error(resp.status_code, f"{self.repo_id}@{self.commit[:12]}: {f.path}", self.endpoint,
                                     self.token_sent, hub.server_message(resp))  # the header: the body is not read
            if offset and resp.status_code == 200:
                raise _RangeIgnored()
            if resp.status_code == 206 and not resp.headers.get("content-range", "").startswith(f"bytes {offset}-"):
                raise OperationFailed(f"{f.path}: the server resumed at the wrong offset; try again")
            for chunk in resp.iter_bytes():  # as it arrives: a sized iterator would lose its buffer on a drop
                write_all(fh, chunk)
                sha256.update(chunk)
                sha1.update(chunk)
                offset += len(chunk)
                self.bytes_downloaded += len(chunk)
                self.reporter.advance(len(chunk))
                self.reporter.file_advance(handle, len(chunk))
                if offset > f.size:
                    break
        return offset

    @contextlib.contextmanager
    def _being_read(self, resp: httpx.Response) -> Iterator[None]:
        with self._lock:
            self._reading.add(resp)
        try:
            if self.aborted.is_set():  # abort() ran between the request and here: it did not see this one
                _cut(resp)
            yield
        finally:
            with self._lock:
                self._reading.discard(resp)


def _cut(resp: httpx.Response) -> None:
    """Shut down the socket a response is read from (from another thread): a read blocked on it returns now.

    Closing the response would not do: on Linux, close() leaves a recv() in another thread waiting."""
    stream = resp.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class _Aborted(Exception):
    """This download stopped because the pull is stopping (cancel, lost lease, another file failed)."""


class _RangeIgnored(Exception):
    """The server answered a Range request with the whole file."""


def _hashers(f: hub.RemoteFile) -> tuple[Any, Any]:
    """Fresh (sha256, git blob sha1) digests; LFS files are checked by sha256 alone, so their sha1 is a no-op."""
    sha1 = _NoHash() if f.sha256 else hashlib.sha1(f"blob {f.size}\0".encode())
    return hashlib.sha256(), sha1


class _NoHash:
    """Stands in for a digest nobody will look at."""

    def update(self, data) -> None:
        pass

    def hexdigest(self) -> str:
        return ""


def pull(reg: Registry, repo_id: str, revision: str, commit: str, endpoint: str, token: str | None,
         include: list[str] | None = None, exclude: list[str] | None = None, name: str | None = None,
         kind: str | None = None, workers: int = 8, reporter: Reporter | None = None,
         job_id: int | None = None, tags: list[str] | None = None) -> PullResult:
    """Download `repo_id` at `commit` into the store and register it, tagged REPO_ID:REVISION and `tags`.

    A filtered pull (include/exclude) is a subset of the commit: it is named REPO_ID@<commit>-filtered-<digest>
    (see filtered_name), records its filter in the provenance, and gets only the tags in `tags`, so the repo's
    name, its REPO_ID:REVISION tag and an offline pull keep answering with the whole commit. A filter that
    keeps every file is the whole commit, pulled as without it (else one content would get two names).
    Names and tags the registration would refuse are refused after listing the files, before any download.
    """
    reporter = reporter or NullReporter()
    every = hub.list_files(endpoint, repo_id, commit, token)
    files = hub.select_files(every, include, exclude, f"{repo_id}@{commit[:12]}") if include or exclude else every
    notes = []
    if (include or exclude) and len(files) == len(every):
        notes.append(f"--include/--exclude left out no file of {repo_id}@{commit[:12]}: pulled as the whole "
                     "commit, named and tagged as without them")
        include = exclude = None
    request = _Request(repo_id, revision, commit, endpoint, name, kind, pull_filter(include, exclude), tags or [])
    with reg.read_session() as s:
        check_names(s, request)
    downloader = Downloader(reg, endpoint, repo_id, commit, token, reporter)
    ingested: dict[str, Ingested] = {}
    try:
        present = {f.path: downloader.existing(f) for f in files}
        needed = [f for f in files if present[f.path] is None]
        reporter.start(sum(f.size for f in needed), "B", f"pulling {repo_id}")
        fetched = _fetch_all(downloader, needed, workers, getattr(reporter, "check", None))
        reporter.finish()
        ingested.update({f.path: present[f.path] or fetched[f.path] for f in files})

        def refetch(vanished: set[str]) -> None:  # gc removed them before they were pinned: fetch again
            for f in files:
                if ingested[f.path].sha256 in vanished:
                    ingested[f.path] = downloader.fetch(f)

        result = register_retrying(lambda: _register(reg, request, ingested, job_id, len(needed), downloader),
                                   refetch)
        result.warnings[:0] = notes
        return result
    finally:
        downloader.close()
        release_pins(reg.store, (i.sha256 for i in ingested.values()))


def _fetch_all(downloader: Downloader, needed: list[hub.RemoteFile], workers: int,
               check: Callable[[], None] | None) -> dict[str, Ingested]:
    """Download files in parallel. This thread watches them and, every POLL_SECONDS, calls `check` (a job's
    reporter: raises once the job must stop); on any stop or failure every download is cut at once."""
    pool = ThreadPoolExecutor(max(1, min(workers, len(needed) or 1)))
    futures = {pool.submit(downloader.fetch, f): f.path for f in needed}
    try:
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=POLL_SECONDS, return_when=FIRST_EXCEPTION)
            failed = next((fut for fut in done if fut.exception() is not None), None)
            if failed is not None:
                raise failed.exception()
            if check is not None:
                check()
        return {path: fut.result() for fut, path in futures.items()}
    except BaseException:
        downloader.abort()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # quick: cut reads fail, queued files never start


@dataclass(frozen=True)
class _Request:
    """What was asked for: the commit, and the name, kind, filter and extra tags to register it with."""

    repo_id: str
    revision: str
    commit: str
    endpoint: str
    name: str | None
    kind: str | None
    pull_filter: dict[str, list[str]] | None
    tags: list[str]


def pull_filter(include: list[str] | None, exclude: list[str] | None) -> dict[str, list[str]] | None:
    """The filter of a pull as recorded in its artifact's provenance; None for the whole commit."""
    if not include and not exclude:
        return None
    return {"include": sorted(include or []), "exclude": sorted(exclude or [])}


def filtered_name(repo_id: str, commit: str, digest: str) -> str:
    """The default name of a filtered pull: the commit, marked as a subset, and the subset's own digest prefix
    (two different filters give two names; the same files give the same name, so pulling them again is a no-op)."""
    return f"{repo_id}@{commit[:12]}-filtered-{digest.removeprefix('sha256:')[:8]}"


def _register(reg: Registry, r: _Request, ingested: dict[str, Ingested], job_id: int | None,
              downloaded: int, downloader: Downloader) -> PullResult:
    meta = read_metadata({rel: reg.store.path(i.sha256) for rel, i in ingested.items()})
    kind = checked_kind(r.kind, dict.fromkeys(ingested), meta, f"{r.repo_id}@{r.commit[:12]}")
    digest = manifest_digest(build_manifest(kind, ((p, i.size, i.sha256) for p, i in ingested.items())))
    repo_tag, tags = _tags(r)
    with reg.session() as s:
        chosen = r.name or (filtered_name(r.repo_id, r.commit, digest) if r.pull_filter
                            else _default_name(s, r.repo_id, r.commit, digest))
        a, created, linked = register_with_base(
            s, reg.store, name=chosen, kind=kind, files=ingested, meta=meta,
            source={"repo": r.repo_id, "revision": r.commit, "endpoint": r.endpoint, "ref": r.revision},
            job_id=job_id, provenance={"pull_filter": r.pull_filter} if r.pull_filter else None)
        for tag in tags:
            tag_artifact(s, a, tag)
        warnings = [f"{rel} is a pickle file: loading it can run arbitrary code; prefer safetensors"
                    for rel in meta.get("unsafe_files", [])]
        return PullResult(a.id, a.name, a.digest, a.kind, r.repo_id, r.commit, repo_tag, len(a.files), a.total_size,
                          created, downloaded, downloader.bytes_downloaded, downloader.bytes_reread, warnings,
                          tags, r.pull_filter, linked.to_dict() if linked is not None else None)


def _tags(r: _Request) -> tuple[str | None, list[str]]:
    """(REPO_ID:REVISION, or None for a filtered pull; every tag the pull points at its artifact)."""
    repo_tag = None if r.pull_filter else f"{r.repo_id}:{r.revision}"
    return repo_tag, list(dict.fromkeys([t for t in [repo_tag, *r.tags] if t]))


def check_names(session, r: _Request) -> None:
    """Refuse, before any download, the names and tags registration would refuse (with the same messages): a
    --name that is a tag, a tag that is an artifact's name (or the name this pull takes), and a default name
    that has to step aside (a tag holds the repo id) onto REPO_ID@<commit> when that is a tag too.

    What needs the digest stays at registration: a --name other content holds, and a filtered pull's name."""
    if r.name is not None:
        check_new_name(session, r.name)
        own = r.name
    elif r.pull_filter:
        own = None
    elif session.get(Tag, r.repo_id) is not None:
        own = f"{r.repo_id}@{r.commit[:12]}"
        check_new_name(session, own)
    else:  # the repo id, unless an artifact with other content holds it (only the digest tells)
        holder = session.scalars(select(Artifact).where(Artifact.name == r.repo_id,
                                                        Artifact.status != "deleted")).first()
        own = r.repo_id if holder is None else None
    for tag in _tags(r)[1]:
        check_tag(session, tag, own)


def check_pull(reg: Registry, repo_id: str, revision: str, commit: str, name: str | None = None,
               include: list[str] | None = None, exclude: list[str] | None = None,
               tags: list[str] | None = None) -> None:
    """check_names for a pull as asked, before it is queued (so --detach refuses at once, leaving no job).
    pull() checks again after listing the files: a filter may turn out to keep them all."""
    with reg.read_session() as s:
        check_names(s, _Request(repo_id, revision, commit, "", name, None, pull_filter(include, exclude),
                                tags or []))


def _default_name(session, repo_id: str, commit: str, digest: str) -> str:
    """The repo id, unless another artifact or a tag holds that name; then repo_id@<commit prefix>."""
    return repo_id if name_available(session, repo_id, digest) else f"{repo_id}@{commit[:12]}"


def find_pulled(reg: Registry, repo_id: str, revision: str, include: list[str] | None = None,
                exclude: list[str] | None = None) -> dict[str, Any] | None:
    """An artifact already pulled for repo@revision with this filter, for offline use.

    The whole commit: the REPO_ID:REVISION tag, else an unfiltered pull of a commit id prefix. A filtered
    request: a pull with the same filter of the tag's commit, of that branch or tag, or of a commit id prefix;
    else such a pull of the whole commit when the filter keeps all its files (pull() registers it so).
    """
    wanted = pull_filter(include, exclude)
    with reg.session() as s:
        tag = s.get(Tag, f"{repo_id}:{revision}")
        artifact = s.get(Artifact, tag.artifact_id) if tag else None
        if artifact is not None and (artifact.status == "deleted" or wanted is not None):
            commit = artifact.source_revision if artifact.source_repo == repo_id else None
            artifact = None
        else:
            commit = None
        if artifact is None:
            at = [Artifact.source_ref == revision]
            if commit:
                at.append(Artifact.source_revision == commit)
            if len(revision) >= 7:
                at.append(Artifact.source_revision.startswith(revision))
            candidates = list(s.scalars(select(Artifact).where(Artifact.source_repo == repo_id, or_(*at),
                                                               Artifact.status != "deleted")
                                        .order_by(Artifact.id.desc())))
            artifact = next((a for a in candidates if (a.provenance or {}).get("pull_filter") == wanted), None)
            if artifact is None and wanted is not None:
                artifact = next((a for a in candidates if not (a.provenance or {}).get("pull_filter") and all(
                    hub.selects(f.path, include, exclude) for f in a.files)), None)
        if artifact is None:
            return None
        return {"name": artifact.name, "digest": artifact.digest, "commit": artifact.source_revision,
                "files": len(artifact.files), "size": artifact.total_size}


def pull_offline(reg: Registry, repo_id: str, revision: str, include: list[str] | None = None,
                 exclude: list[str] | None = None) -> dict[str, Any]:
    """With HF_HUB_OFFLINE set: succeed from the store when present, else a clear error."""
    found = find_pulled(reg, repo_id, revision, include, exclude)
    if found is None:
        what = " with this --include/--exclude filter" if pull_filter(include, exclude) else ""
        raise NotFound(f"HF_HUB_OFFLINE is set and {repo_id}@{revision}{what} is not in the registry; "
                       "pull it once while online")
    return found
