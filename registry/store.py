"""Content-addressed blob store: `<home>/blobs/sha256/<2 hex>/<64 hex>`, written once, read-only.

Ingest hashes while it writes into a temporary file on the same file system, fsyncs and renames, so a
crash never leaves a half-written blob and no byte is read twice. Everything outside this module reaches
blobs and temporary files through `BlobStore`, so another backend can be added without touching callers.

Pins: before an ingest looks at whether a blob is already in the store (or publishes one), it pins the
digest in the catalog (see gclock.py); gc never removes a pinned blob, so a blob this ingest reuses cannot
vanish before the artifact that references it is registered.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, Protocol

from .errors import BadInput, DiskFull, OperationFailed
from .fsutil import (LOCK_NAME, TempFile, disk_error, durable_mkdir, fsync_dir, held, reflink, remove_tree,
                     remove_unheld_dir, remove_unheld_file, still_named, tree_size)
from .records import RecordStore

CHUNK = 8 * 1024 * 1024
# Files up to this size also get their git blob id while they are ingested: the hub stores small files in git
# and lists only that id for them, so a later pull finds imported copies by it and downloads nothing.
GIT_SHA1_MAX = 10 * 1024 * 1024
ProgressFn = Callable[[int], None]
SHA_RE = re.compile(r"^[0-9a-f]{64}$")
PARTIAL_PREFIX = "pull-"
_NO_LINK = (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES)


@dataclass(frozen=True)
class StatStamp:
    """What `verify --quick` compares: size, mtime and inode of a blob file."""

    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, path: Path) -> "StatStamp":
        st = os.stat(path)
        return cls(st.st_size, st.st_mtime_ns, st.st_ino)


@dataclass(frozen=True)
class Ingested:
    """A blob in the store: its digest, size, whether this call added it, and its stat stamp."""

    sha256: str
    size: int
    added: bool
    stamp: StatStamp
    git_sha1: str | None = None


@dataclass(frozen=True)
class BlobInfo:
    """A blob file found on disk: digest, size, when it appeared (ctime) and was written (mtime), in seconds."""

    sha256: str
    size: int
    ctime: float
    mtime: float


@dataclass(frozen=True)
class TempEntry:
    """A file or folder in the store's temporary area that no live process holds."""

    name: str
    size: int
    age: float  # seconds since it was last written
    is_partial: bool  # a pull's partial download, kept for a resume window


class Pinner(Protocol):
    """Records, in the catalog, that a running ingest uses these blobs (gclock.BlobPins)."""

    owner: str

    def pin(self, shas: Iterable[str]) -> None: ...


class BlobStore(Protocol):
    """The small interface pull, import, merge, quantize, verify, export, register and gc use."""

    pins: Pinner | None
    records: RecordStore  # artifact records beside the blobs (records.py), for rebuilding a lost catalog

    def path(self, sha256: str) -> Path: ...
    def exists(self, sha256: str) -> bool: ...
    def size(self, sha256: str) -> int | None: ...
    def open(self, sha256: str) -> BinaryIO: ...
    def reuse(self, sha256: str, size: int | None = None) -> Ingested | None: ...
    def ingest_file(self, source: Path, link: bool = False, progress: ProgressFn | None = None,
                    replace: bool = False) -> Ingested: ...
    def ingest_stream(self, stream: BinaryIO, progress: ProgressFn | None = None) -> Ingested: ...
    def writer(self) -> "BlobWriter": ...
    def partial(self, key: str) -> "PartialDownload": ...
    def disk_full_while_downloading(self, file_name: str) -> DiskFull: ...
    def delete(self, sha256: str) -> int: ...
    def iter_blobs(self) -> Iterator[BlobInfo]: ...
    def temp_entries(self) -> Iterator[TempEntry]: ...
    def remove_temp(self, entry: TempEntry) -> bool: ...
    def scratch_dir(self, prefix: str) -> contextlib.AbstractContextManager[Path]: ...
    def materialize(self, sha256: str, dest: Path, how: str = "auto") -> str: ...


def git_blob_hasher(size: int):
    """A sha1 primed with git's blob header for `size` bytes, or None for a file above GIT_SHA1_MAX."""
    return hashlib.sha1(f"blob {size}\0".encode()) if size <= GIT_SHA1_MAX else None


def hash_stream(stream: BinaryIO, progress: ProgressFn | None = None, also=None) -> tuple[str, int]:
    """SHA-256 and length of a stream, read in large chunks into one reused buffer (`also`, a second digest,
    is fed the same bytes)."""
    digest = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total = 0
    while True:
        n = stream.readinto(buf)
        if not n:
            break
        digest.update(view[:n])
        if also is not None:
            also.update(view[:n])
        total += n
        if progress:
            progress(n)
    return digest.hexdigest(), total


def write_all(sink: BinaryIO, data: bytes | memoryview) -> None:
    """Write every byte to an unbuffered file; a full disk raises DiskFull."""
    # An unbuffered write may be short (the disk filling up is one cause): loop until all is written,
    # so the next write raises ENOSPC instead of the blob silently missing its tail.
    data = memoryview(data)
    try:
        while data:
            written = sink.write(data)
            if not written:
                raise OSError(errno.ENOSPC, "short write to the store")
            data = data[written:]
    except OSError as exc:
        raise disk_error(exc) from None


def hash_file(path: Path, progress: ProgressFn | None = None) -> tuple[str, int]:
    """SHA-256 and size of a file, read once in large chunks."""
    with open(path, "rb", buffering=0) as f:
        return hash_stream(f, progress)


def current_umask() -> int:
    """The process umask, read without changing it (os.umask would race with other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def configured_file_mode() -> int | None:
    """REGISTRY_FILE_MODE (octal, e.g. 0440 for a group-shared store), or None to follow the umask."""
    raw = os.environ.get("REGISTRY_FILE_MODE", "").strip()
    if not raw:
        return None
    try:
        mode = int(raw, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777 or mode & 0o222 or not mode & 0o400:
        raise BadInput(f"REGISTRY_FILE_MODE={raw!r} is not a read-only octal file mode; use e.g. 0440 or 0444 "
                       "(blobs are never writable)")
    return mode


class LocalStore:
    """Blobs on a local (or shared, POSIX) file system under the registry home."""

    def __init__(self, home: Path, pins: Pinner | None = None):
        self.home = Path(home)
        self.pins = pins
        self.records = RecordStore(self.home / "records")
        self._configured_mode = configured_file_mode()  # checked up front: a bad value fails every command
        self._root = self.home / "blobs" / "sha256"
        self._tmp = self.home / "tmp"

    # -- reading ---------------------------------------------------------------------------------------

    def path(self, sha256: str) -> Path:
        """Where the blob with this digest can be read (a local file)."""
        return self._root / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        """True when the blob file is present."""
        return self.path(sha256).is_file()

    def size(self, sha256: str) -> int | None:
        """The blob file's size, or None when it is missing."""
        try:
            return self.path(sha256).stat().st_size
        except FileNotFoundError:
            return None

    def open(self, sha256: str) -> BinaryIO:
        """The blob's bytes, unbuffered."""
        return open(self.path(sha256), "rb", buffering=0)

    def reuse(self, sha256: str, size: int | None = None) -> Ingested | None:
        """Pin a blob and return it when the store already has it (with this size); else None."""
        self._pin(sha256)  # first: gc may not remove it from now on, so the answer below stays true
        found = self.size(sha256)
        if found is None or (size is not None and found != size):
            return None
        return Ingested(sha256, found, False, StatStamp.of(self.path(sha256)))

    # -- writing ---------------------------------------------------------------------------------------

    def ingest_file(self, source: Path, link: bool = False, progress: ProgressFn | None = None,
                    replace: bool = False) -> Ingested:
        """Add a file's content to the store; with `link`, hardlink it instead of copying when possible.

        With `replace`, a present blob of the same digest is overwritten (repair of a damaged blob file)."""
        if replace:
            with open(source, "rb", buffering=0) as src, BlobWriter(self, replace=True) as w:
                return w.copy_from(src, progress)
        if link:
            linked = self._ingest_link(Path(source), progress)
            if linked is not None:
                return linked
        with open(source, "rb", buffering=0) as src, BlobWriter(self, git_size=os.fstat(src.fileno()).st_size) as w:
            return w.copy_from(src, progress)

    def ingest_stream(self, stream: BinaryIO, progress: ProgressFn | None = None) -> Ingested:
        """Copy a stream into the store, hashing it in the same pass."""
        with self.writer() as w:
            return w.copy_from(stream, progress)

    def writer(self) -> "BlobWriter":
        """A new blob written piece by piece (hashed as it is written); call finish() to publish it."""
        return BlobWriter(self)

    def partial(self, key: str) -> "PartialDownload":
        """The locked, resumable partial download for `key` (waits while another process holds it)."""
        return PartialDownload(self, self._tmp / f"{PARTIAL_PREFIX}{key}.part")

    def partial_bytes(self) -> int:
        """Bytes held by partial downloads (for the disk-full message)."""
        total = 0
        for path in self._tmp.glob(f"{PARTIAL_PREFIX}*.part") if self._tmp.is_dir() else ():
            with contextlib.suppress(FileNotFoundError):
                total += path.stat().st_size
        return total

    def disk_full_while_downloading(self, file_name: str) -> DiskFull:
        """The error a pull raises when its partial downloads fill the disk: what filled it, and where."""
        mib = self.partial_bytes() / 2**20
        return DiskFull(f"disk full while downloading {file_name} into {self._tmp} (partial downloads there: "
                        f"{mib:.0f} MiB); free space and run the pull again to resume")

    def _ingest_link(self, source: Path, progress: ProgressFn | None) -> Ingested | None:
        before = StatStamp.of(source)
        git = git_blob_hasher(before.size)
        with open(source, "rb", buffering=0) as f:
            sha, size = hash_stream(f, progress, git)
        if StatStamp.of(source) != before:
            raise OperationFailed(f"{source} changed while it was being imported; import it again")
        git_sha1 = git.hexdigest() if git is not None and size == before.size else None
        found = self.reuse(sha, size)
        if found is not None:
            return dataclasses.replace(found, git_sha1=git_sha1)
        with open(source, "rb") as f:  # the store's copy is this inode: make its data durable first
            os.fsync(f.fileno())
        # The link is made in a locked scratch folder: gc must not take it for a stale temp file (it has
        # the source's times, which may be months old).
        with self.scratch_dir("link") as scratch:
            tmp_path = scratch / "blob"
            try:
                os.link(source, tmp_path)
            except OSError as exc:
                if exc.errno in _NO_LINK:
                    return None  # another file system: fall back to a copy
                raise
            if StatStamp.of(tmp_path) != before:  # written to between hashing and linking
                raise OperationFailed(f"{source} changed while it was being imported; import it again")
            return dataclasses.replace(self._publish(tmp_path, sha, size, pinned=True), git_sha1=git_sha1)

    def _publish(self, tmp_path: Path, sha: str, size: int, pinned: bool = False,
                 replace: bool = False) -> Ingested:
        """Move a complete, fsynced file whose digest is known into the store (or drop it if present).

        `replace` puts it over a blob file that is present but damaged (repair): the new content hashes to
        `sha`, so the swap is one atomic rename and readers see either the old file or the good one.
        """
        if not pinned:
            self._pin(sha)
        dest = self.path(sha)
        if dest.exists() and not replace:
            tmp_path.unlink(missing_ok=True)
            return Ingested(sha, size, False, StatStamp.of(dest))
        durable_mkdir(dest.parent)
        os.chmod(tmp_path, self._file_mode())
        os.replace(tmp_path, dest)  # atomic; a concurrent identical ingest just replaces equal bytes
        fsync_dir(dest.parent)  # the new name
        fsync_dir(tmp_path.parent)  # the old name's removal
        return Ingested(sha, size, True, StatStamp.of(dest))

    def _pin(self, sha: str) -> None:
        if self.pins is not None:
            self.pins.pin([sha])

    def _file_mode(self) -> int:
        return self._configured_mode if self._configured_mode is not None else 0o444 & ~current_umask()

    def _temp_file(self) -> "TempFile":
        return TempFile(self._tmp)

    # -- removing --------------------------------------------------------------------------------------

    def delete(self, sha256: str) -> int:
        """Remove a blob; returns the bytes freed. Callers hold the exclusive gc lock (gc.py)."""
        path = self.path(sha256)
        try:
            size = path.stat().st_size
            path.unlink()
            return size
        except FileNotFoundError:
            return 0

    def iter_blobs(self) -> Iterator[BlobInfo]:
        """Every blob file on disk; files that vanish while listed are skipped."""
        if not self._root.is_dir():
            return
        for sub in sorted(self._root.iterdir()):
            if not sub.is_dir():
                continue
            for path in sorted(sub.iterdir()):
                if not SHA_RE.match(path.name):
                    continue
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue
                yield BlobInfo(path.name, st.st_size, st.st_ctime, st.st_mtime)

    def temp_entries(self) -> Iterator[TempEntry]:
        """Temporary files and scratch folders that no live process holds a lock on."""
        if not self._tmp.is_dir():
            return
        now = time.time()
        for path in sorted(self._tmp.iterdir()):
            try:
                st = path.lstat()
                if held(path):
                    continue
                size = tree_size(path) if path.is_dir() else st.st_size
            except FileNotFoundError:
                continue  # finished (published or cleaned up) while we looked
            yield TempEntry(path.name, size, now - st.st_mtime,
                            path.name.startswith(PARTIAL_PREFIX) and path.name.endswith(".part"))

    def remove_temp(self, entry: TempEntry) -> bool:
        """Remove a temp entry if still no process holds it; False when it is in use (or already gone)."""
        path = self._tmp / entry.name
        try:
            if path.is_dir() and not path.is_symlink():
                return remove_unheld_dir(path)
            return remove_unheld_file(path)
        except FileNotFoundError:
            return False

    @contextlib.contextmanager
    def scratch_dir(self, prefix: str) -> Iterator[Path]:
        """A private folder in the store's temp area, on the store's file system (so results can be
        renamed in); held by a lock so gc leaves it alone while we live, and removed on exit."""
        self._tmp.mkdir(parents=True, exist_ok=True)
        while True:  # made, then locked: if gc took the folder in between, make another (see TempFile)
            path = Path(tempfile.mkdtemp(dir=self._tmp, prefix=f"{prefix}-"))
            try:
                lock = open(path / LOCK_NAME, "wb")
            except FileNotFoundError:
                continue
            fcntl.flock(lock, fcntl.LOCK_EX)
            if still_named(path / LOCK_NAME, lock):
                break
            lock.close()
        try:
            yield path
        finally:
            lock.close()
            if path.exists():
                remove_tree(path)

    def materialize(self, sha256: str, dest: Path, how: str = "auto") -> str:
        """Place a blob at `dest` and say how: "reflink", "hardlink" or "copy".

        how="auto": reflink, else hardlink, else copy. how="copy": an independent writable file (a reflink
        is one). how="link": hardlink, else copy (read-only snapshots, which share the store's inode).
        """
        source = self.path(sha256)
        if how in ("auto", "copy") and reflink(source, dest):
            return "reflink"
        if how in ("auto", "link"):
            try:
                os.link(source, dest)
                return "hardlink"
            except OSError as exc:
                if exc.errno not in _NO_LINK:
                    raise
        try:
            shutil.copyfile(source, dest)  # a new file: its mode follows the umask
        except OSError as exc:
            raise disk_error(exc) from None
        return "copy"


class BlobWriter:
    """Writes a blob into a locked temporary file, hashing in the same pass; nothing is left if not finished."""

    def __init__(self, store: LocalStore, replace: bool = False, git_size: int | None = None):
        self.store, self.replace = store, replace
        self.digest = hashlib.sha256()
        self.size = 0
        # With the size of a small file known up front, its git blob id is computed in the same pass.
        self.git_size = git_size
        self.git = git_blob_hasher(git_size) if git_size is not None else None

    def __enter__(self) -> "BlobWriter":
        self._temp = self.store._temp_file()
        self.path, self.file = self._temp.__enter__()
        return self

    def write(self, data: bytes | memoryview) -> None:
        """Append bytes to the blob."""
        write_all(self.file, data)
        self.digest.update(data)
        if self.git is not None:
            self.git.update(data)
        self.size += len(data)

    def copy_from(self, stream: BinaryIO, progress: ProgressFn | None = None) -> Ingested:
        """Write a whole stream and publish it."""
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := stream.readinto(buf):
            self.write(view[:n])
            if progress:
                progress(n)
        return self.finish()

    def finish(self) -> Ingested:
        """fsync and move the blob into the store."""
        try:
            os.fsync(self.file.fileno())
        except OSError as exc:
            raise disk_error(exc) from None
        if os.fstat(self.file.fileno()).st_size != self.size:
            raise OperationFailed(f"the store wrote {os.fstat(self.file.fileno()).st_size} of {self.size} bytes; "
                                  "check the disk and try again")
        published = self.store._publish(self.path, self.digest.hexdigest(), self.size, replace=self.replace)
        if self.git is None or self.size != self.git_size:  # the file grew or shrank as it was read
            return published
        return dataclasses.replace(published, git_sha1=self.git.hexdigest())

    def __exit__(self, *exc) -> None:
        self._temp.__exit__(*exc)


class PartialDownload:
    """`tmp/pull-<key>.part`, opened for appending and exclusively locked; publish() moves it into the store.

    A second process pulling the same content waits on the lock, then finds the blob published. The
    file is kept when the download fails, so the next pull resumes it (gc keeps it for a resume window).
    """

    def __init__(self, store: LocalStore, path: Path):
        self.store, self.path = store, path

    def __enter__(self) -> "PartialDownload":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fh = open(self.path, "ab+", buffering=0)
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                if os.fstat(fh.fileno()).st_ino == os.stat(self.path).st_ino:
                    self.file = fh
                    return self
            except FileNotFoundError:
                pass
            fh.close()  # published or removed by gc meanwhile; look again

    def publish(self, sha256: str, size: int, replace: bool = False) -> Ingested:
        """fsync the complete, verified file and move it into the store as blob `sha256` (over a damaged
        blob file with `replace`)."""
        try:
            os.fsync(self.file.fileno())
        except OSError as exc:
            raise disk_error(exc) from None
        return self.store._publish(self.path, sha256, size, replace=replace)

    def __exit__(self, *exc) -> None:
        self.file.close()
