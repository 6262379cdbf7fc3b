"""Content-addressed blob store: `<home>/blobs/sha256/<2 hex>/<64 hex>`, written once, read-only.

Ingest hashes while it writes into a temporary file on the same file system, fsyncs and renames, so a
crash never leaves a half-written blob and no byte is read twice.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Protocol

from .errors import DiskFull, OperationFailed

CHUNK = 8 * 1024 * 1024
ProgressFn = Callable[[int], None]


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


class BlobStore(Protocol):
    """The small interface the catalog needs from storage."""

    def path(self, sha256: str) -> Path: ...
    def exists(self, sha256: str) -> bool: ...
    def ingest_file(self, source: Path, link: bool = False, progress: ProgressFn | None = None) -> Ingested: ...
    def delete(self, sha256: str) -> int: ...
    def iter_blobs(self) -> Iterator[tuple[str, Path]]: ...


def hash_stream(stream: BinaryIO, progress: ProgressFn | None = None) -> tuple[str, int]:
    """SHA-256 and length of a stream, read in large chunks into one reused buffer."""
    digest = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total = 0
    while True:
        n = stream.readinto(buf)
        if not n:
            break
        digest.update(view[:n])
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
        raise _disk_error(exc) from None


def hash_file(path: Path, progress: ProgressFn | None = None) -> tuple[str, int]:
    """SHA-256 and size of a file, read once in large chunks."""
    with open(path, "rb", buffering=0) as f:
        return hash_stream(f, progress)


class LocalStore:
    """Blobs on a local (or shared, POSIX) file system under the registry home."""

    def __init__(self, home: Path):
        self.home = Path(home)
        self.root = self.home / "blobs" / "sha256"
        self.tmp = self.home / "tmp"

    def path(self, sha256: str) -> Path:
        """Where the blob with this digest lives."""
        return self.root / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        """True when the blob file is present."""
        return self.path(sha256).is_file()

    def ingest_file(self, source: Path, link: bool = False, progress: ProgressFn | None = None) -> Ingested:
        """Add a file's content to the store; with `link`, hardlink it instead of copying when possible."""
        if link:
            linked = self._ingest_link(Path(source), progress)
            if linked is not None:
                return linked
        with open(source, "rb", buffering=0) as src:
            return self.ingest_stream(src, progress)

    def ingest_stream(self, stream: BinaryIO, progress: ProgressFn | None = None) -> Ingested:
        """Copy a stream into the store, hashing it in the same pass."""
        with self.writer() as w:
            buf = bytearray(CHUNK)
            view = memoryview(buf)
            while n := stream.readinto(buf):
                w.write(view[:n])
                if progress:
                    progress(n)
            return w.finish()

    def writer(self) -> "BlobWriter":
        """A new blob written piece by piece (hashed as it is written); call finish() to publish it."""
        return BlobWriter(self)

    def _ingest_link(self, source: Path, progress: ProgressFn | None) -> Ingested | None:
        before = StatStamp.of(source)
        sha, size = hash_file(source, progress)
        if StatStamp.of(source) != before:
            raise OperationFailed(f"{source} changed while it was being imported; import it again")
        if self.exists(sha):
            return Ingested(sha, size, False, StatStamp.of(self.path(sha)))
        self.tmp.mkdir(parents=True, exist_ok=True)
        tmp_path = Path(tempfile.mktemp(dir=self.tmp, prefix="link-"))
        try:
            os.link(source, tmp_path)
        except OSError as exc:
            if exc.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                return None  # another file system: fall back to a copy
            raise
        return self.publish(tmp_path, sha, size)

    def publish(self, tmp_path: Path, sha: str, size: int) -> Ingested:
        """Move a complete, fsynced file whose digest is known into the store (or drop it if present)."""
        dest = self.path(sha)
        if dest.exists():
            tmp_path.unlink(missing_ok=True)
            return Ingested(sha, size, False, StatStamp.of(dest))
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(tmp_path, 0o444)
        os.replace(tmp_path, dest)  # atomic; a concurrent identical ingest just replaces equal bytes
        _fsync_dir(dest.parent)
        return Ingested(sha, size, True, StatStamp.of(dest))

    def temp_file(self):
        """A locked temporary file in the store's tmp folder, removed unless published."""
        return _TempFile(self.tmp)

    def delete(self, sha256: str) -> int:
        """Remove a blob; returns the bytes freed."""
        path = self.path(sha256)
        try:
            size = path.stat().st_size
            path.unlink()
            return size
        except FileNotFoundError:
            return 0

    def iter_blobs(self) -> Iterator[tuple[str, Path]]:
        """Every blob file on disk as (digest, path)."""
        if not self.root.is_dir():
            return
        for sub in sorted(self.root.iterdir()):
            if sub.is_dir():
                for path in sorted(sub.iterdir()):
                    yield path.name, path

    def stale_temp_files(self) -> Iterator[Path]:
        """Temporary files that no live process holds a lock on."""
        if not self.tmp.is_dir():
            return
        for path in sorted(self.tmp.iterdir()):
            try:
                with open(path, "rb") as f:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # an ingest in progress holds it
            except (FileNotFoundError, IsADirectoryError):
                continue
            yield path


class BlobWriter:
    """Writes a blob into a locked temporary file, hashing in the same pass; nothing is left if not finished."""

    def __init__(self, store: LocalStore):
        self.store = store
        self.digest = hashlib.sha256()
        self.size = 0

    def __enter__(self) -> "BlobWriter":
        self._temp = self.store.temp_file()
        self.path, self.file = self._temp.__enter__()
        return self

    def write(self, data: bytes | memoryview) -> None:
        """Append bytes to the blob."""
        write_all(self.file, data)
        self.digest.update(data)
        self.size += len(data)

    def finish(self) -> Ingested:
        """fsync and move the blob into the store."""
        try:
            os.fsync(self.file.fileno())
        except OSError as exc:
            raise _disk_error(exc) from None
        if os.fstat(self.file.fileno()).st_size != self.size:
            raise OperationFailed(f"the store wrote {os.fstat(self.file.fileno()).st_size} of {self.size} bytes; "
                                  "check the disk and try again")
        return self.store.publish(self.path, self.digest.hexdigest(), self.size)

    def __exit__(self, *exc) -> None:
        self._temp.__exit__(*exc)


class _TempFile:
    """Context manager: an exclusively locked temp file; deleted on exit if it still exists."""

    def __init__(self, tmp_dir: Path):
        self.tmp_dir = tmp_dir

    def __enter__(self) -> tuple[Path, BinaryIO]:
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.tmp_dir, prefix="ingest-")
        self.path = Path(name)
        self.file = os.fdopen(fd, "wb", buffering=0)
        # gc skips temp files that a live process holds locked.
        fcntl.flock(self.file, fcntl.LOCK_EX)
        return self.path, self.file

    def __exit__(self, *exc) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _disk_error(exc: OSError) -> Exception:
    if exc.errno == errno.ENOSPC:
        return DiskFull("disk full while writing to the store; free space (registry gc) and try again")
    return exc


def materialize(source: Path, dest: Path, copy: bool = False) -> None:
    """Place a blob at `dest`: a hardlink when possible (and not `copy`), else a writable copy."""
    if not copy:
        try:
            os.link(source, dest)
            return
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
    try:
        shutil.copyfile(source, dest)
    except OSError as exc:
        raise _disk_error(exc) from None
    os.chmod(dest, 0o644)
