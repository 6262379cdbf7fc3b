"""Registering model folders that already exist on disk, or a snapshot in a Hugging Face cache."""
from __future__ import annotations

import json
import os
import threading
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.exc import IntegrityError

from .catalog import check_name, check_not_a_tag, check_tag, register_with_base, resolve, tag_artifact
from .config import load_worker_config
from .core import Registry
from .errors import BadInput, NotFound
from .folder import FolderScan, scan_folder
from .gclock import register_retrying, release_pins
from .progress import NullReporter, Reporter
from .store import Ingested


@dataclass
class ImportResult:
    """What an import did: the artifact, whether it is new, bytes added to the store, and warnings."""

    artifact_id: int
    name: str
    digest: str
    kind: str
    files: int
    size: int
    created: bool
    bytes_added: int
    warnings: list[str] = field(default_factory=list)
    linked: dict[str, Any] | None = None  # a base link this import added to an artifact registered before

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Stopped(Exception):
    """An ingest thread stops because another file failed or the import was interrupted (Ctrl-C)."""


def ingest_files(reg: Registry, files: dict[str, Path], link: bool, reporter: Reporter) -> dict[str, Ingested]:
    """Hash and store every file, in parallel over files.

    On any error, Ctrl-C included, the other files stop at their next chunk and this waits for them before
    unpinning what got in: a thread that ran on would pin blobs after the job released its pins, and those
    pins would keep gc from freeing the blobs for PIN_TTL.
    """
    reporter.start(sum(p.stat().st_size for p in files.values()), "B", "importing")
    stop = threading.Event()

    def advance(n: int) -> None:
        if stop.is_set():
            raise _Stopped()
        reporter.advance(n)

    def ingest(path: Path) -> Ingested:
        if stop.is_set():  # queued before the failure: do not start
            raise _Stopped()
        return reg.store.ingest_file(path, link, advance)

    pool = ThreadPoolExecutor(min(len(files), os.cpu_count() or 1) or 1)
    futures: dict[str, Future] = {}
    try:
        futures = {rel: pool.submit(ingest, path) for rel, path in files.items()}
        wait(futures.values(), return_when=FIRST_EXCEPTION)  # Ctrl-C interrupts this wait
        failure = next((fut.exception() for fut in futures.values() if fut.done() and fut.exception()), None)
        if failure is not None:
            raise failure
    except BaseException:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)  # quick: running files stop at their next chunk
        # Unpin what did get in, so gc may free it without waiting for the pins to expire.
        release_pins(reg.store, (fut.result().sha256 for fut in futures.values()
                                 if fut.done() and not fut.cancelled() and fut.exception() is None))
        raise
    pool.shutdown()
    reporter.finish()
    return {rel: fut.result() for rel, fut in futures.items()}


MAX_EXTRA_META_BYTES = 64 * 1024  # metadata a job adds (training facts): small, it lands in every listing
# What read_metadata derives from the files: extra metadata may not override it.
FILE_META_KEYS = {"model_type", "architectures", "dtype", "quantization_config", "peft_config", "parameter_count",
                  "unsafe_files", "gguf"}


def check_import_extras(extra_meta: Any = None, tags: Any = None, exclude: Any = None) -> None:
    """Refuse extra metadata, tags or exclude globs of the wrong shape (job params come from anyone who can
    queue a job, e.g. the daemon's watch folders): one line naming the parameter and what it must be."""
    if extra_meta is not None:
        if not isinstance(extra_meta, dict) or not all(isinstance(k, str) and k for k in extra_meta):
            raise BadInput(f"import metadata must be an object with string keys, got {json.dumps(extra_meta)[:60]}")
        try:
            size = len(json.dumps(extra_meta, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise BadInput(f"import metadata is not plain JSON ({exc})") from None
        if size > MAX_EXTRA_META_BYTES:
            raise BadInput(f"import metadata is {size} bytes of JSON; at most {MAX_EXTRA_META_BYTES} are kept")
        clash = sorted(set(extra_meta) & FILE_META_KEYS)
        if clash:
            raise BadInput(f"import metadata key {clash[0]!r} is read from the files; use another key")
    if tags is not None and (not isinstance(tags, list) or not all(isinstance(t, str) for t in tags)):
        raise BadInput(f"import tags must be a list of tag names, got {json.dumps(tags)[:60]}")
    if exclude is not None and (not isinstance(exclude, list) or not all(isinstance(g, str) and g for g in exclude)):
        raise BadInput(f"import exclude must be a list of glob patterns, got {json.dumps(exclude)[:60]}")



def import_folder(reg: Registry, folder: str | os.PathLike, name: str, kind: str | None = None,
                  base: str | None = None, link: bool = False, reporter: Reporter | None = None,
                  job_id: int | None = None, source: dict[str, Any] | None = None,
                  contain_within: Path | None = None, extra_meta: dict[str, Any] | None = None,
                  tags: list[str] | None = None, exclude: list[str] | None = None) -> ImportResult:
    """Register a local Hugging Face style folder as an artifact, storing each distinct file once.

    `extra_meta` is merged into the artifact's metadata (e.g. `training` facts of a checkpoint), `tags` point
    at the artifact once registered (moved from another artifact if they exist), `exclude` leaves matching
    files and folders out (folder.excluded)."""
    check_name(name)
    check_import_extras(extra_meta, tags, exclude)
    # Resolved once and used from here on, so a symlink swapped after the check cannot lead outside the roots.
    folder = load_worker_config(reg.home).check_path(folder, "import folder")
    scan = scan_folder(folder, kind, contain_within, exclude or ())
    if extra_meta:
        scan.meta = {**scan.meta, **extra_meta}
    with reg.read_session() as s:  # fail on a name that is a tag, or an unknown base, before reading any bytes
        check_not_a_tag(s, name)
        if base is not None:
            resolve(s, base)
        for tag in tags or ():
            check_tag(s, tag, name)
    ingested = ingest_files(reg, scan.files, link, reporter or NullReporter())
    source = source or {"path": str(Path(folder).resolve())}
    warnings = [f"{rel} is a pickle file: loading it can run arbitrary code; prefer safetensors"
                for rel in scan.unsafe_files]
    added = sum(i.size for i in ingested.values() if i.added)

    def register() -> ImportResult:
        try:
            return _register(reg, scan, name, base, ingested, source, job_id, added, warnings, tags or [])
        except IntegrityError:  # another process registered the same name meanwhile: same content is fine
            return _register(reg, scan, name, base, ingested, source, job_id, added, warnings, tags or [])

    def reingest(vanished: set[str]) -> None:  # a concurrent gc removed them before they were pinned
        again = {rel: scan.files[rel] for rel, i in ingested.items() if i.sha256 in vanished}
        ingested.update(ingest_files(reg, again, link, NullReporter()))

    try:
        return register_retrying(register, reingest)
    finally:
        release_pins(reg.store, (i.sha256 for i in ingested.values()))


def _register(reg: Registry, scan: FolderScan, name: str, base: str | None, ingested: dict[str, Ingested],
              source: dict[str, Any], job_id: int | None, added: int, warnings: list[str],
              tags: list[str]) -> ImportResult:
    with reg.session() as s:
        # Linked as pull links (register_with_base); importing an adapter again repairs its base link.
        a, created, linked = register_with_base(s, reg.store, base=resolve(s, base) if base is not None else None,
                                                name=name, kind=scan.kind, files=ingested, meta=scan.meta,
                                                source=source, job_id=job_id)
        for tag in tags:  # in the registering transaction: the artifact never exists without its tags
            tag_artifact(s, a, tag)
        return ImportResult(a.id, a.name, a.digest, a.kind, len(a.files), a.total_size, created,
                            added, warnings, linked.to_dict() if linked is not None else None)


def hf_cache_snapshot(repo_id: str, revision: str = "main", cache_dir: str | os.PathLike | None = None) -> tuple[Path, str, Path]:
    """Locate a snapshot in a Hugging Face cache: (snapshot folder, commit, repo cache folder)."""
    from huggingface_hub import constants

    if repo_id.count("/") > 1 or ".." in repo_id or not repo_id.strip("/"):
        raise BadInput(f"invalid repo id {repo_id!r}; use 'org/name'")
    root = Path(cache_dir or constants.HF_HUB_CACHE)
    repo_dir = root / ("models--" + repo_id.replace("/", "--"))
    if not repo_dir.is_dir():
        raise NotFound(f"{repo_id} is not in the Hugging Face cache at {root}; download it first or pass --cache-dir")
    ref_file = repo_dir / "refs" / revision
    commit = ref_file.read_text().strip() if ref_file.is_file() else revision
    snapshot = repo_dir / "snapshots" / commit
    if not snapshot.is_dir():
        raise NotFound(f"revision {revision!r} of {repo_id} is not in the Hugging Face cache at {root}")
    return snapshot, commit, repo_dir


def import_hf_cache(reg: Registry, repo_id: str, name: str | None = None, revision: str = "main",
                    cache_dir: str | os.PathLike | None = None, kind: str | None = None,
                    base: str | None = None, link: bool = False, reporter: Reporter | None = None,
                    job_id: int | None = None) -> ImportResult:
    """Register a snapshot from a Hugging Face cache; its symlinks may point into the cache's blobs."""
    from huggingface_hub import constants

    load_worker_config(reg.home).check_path(cache_dir or constants.HF_HUB_CACHE, "Hugging Face cache folder")
    snapshot, commit, repo_dir = hf_cache_snapshot(repo_id, revision, cache_dir)
    # The cache does not say which hub filled it: HF_ENDPOINT now is the best guess (verify --upstream asks it).
    endpoint = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or None
    return import_folder(reg, snapshot, name or repo_id, kind, base, link, reporter, job_id,
                         source={"repo": repo_id, "revision": commit, "path": str(snapshot), "endpoint": endpoint,
                                 "ref": revision if revision != commit else None},
                         contain_within=repo_dir)
