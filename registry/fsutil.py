"""File-system steps the blob store is built from: locked temp files, removing what no live process holds,
durable folders (fsync of the parent), reflinks, and a disk-full error that says what to do.

They sit apart from store.py so that the store reads as the store; nothing here knows about blobs or digests.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO

from .errors import DiskFull

LOCK_NAME = ".lock"  # inside a scratch folder: held by the process using it
FICLONE = 0x40049409  # Linux ioctl: share the source's extents (btrfs, xfs, bcachefs); a copy that costs no space
_NO_REFLINK = (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.EPERM, errno.ENOSYS, errno.EBADF)


class TempFile:
    """Context manager: an exclusively locked temp file; deleted on exit if it still exists.

    mkstemp and flock are two steps, so after locking we check the name is still our file: gc removes a
    temp file only while holding its lock, so once we hold it and the name is ours, gc cannot take it;
    if gc took it in between, we simply make another."""

    def __init__(self, tmp_dir: Path):
        self.tmp_dir = tmp_dir

    def __enter__(self) -> tuple[Path, BinaryIO]:
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd, name = tempfile.mkstemp(dir=self.tmp_dir, prefix="ingest-")
            self.path = Path(name)
            self.file = os.fdopen(fd, "wb", buffering=0)
            fcntl.flock(self.file, fcntl.LOCK_EX)  # gc skips temp files that a live process holds locked
            if still_named(self.path, self.file):
                return self.path, self.file
            self.file.close()

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)  # before closing: while locked, gc cannot be looking at it
        self.file.close()


def still_named(path: Path, file: BinaryIO) -> bool:
    """True when `path` still names the open file (gc did not remove it before we locked it)."""
    try:
        return os.stat(path).st_ino == os.fstat(file.fileno()).st_ino
    except FileNotFoundError:
        return False


def held(path: Path) -> bool:
    """True when a live process holds the entry's lock (a folder's lock is its `.lock` file)."""
    target = path / LOCK_NAME if path.is_dir() and not path.is_symlink() else path
    try:
        with open(target, "rb") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except FileNotFoundError:
        if target is path:
            raise
    return False


def remove_unheld_file(path: Path) -> bool:
    with open(path, "rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        # The name may now be a new file (a partial's name is reused): remove only the inode we hold.
        if os.fstat(f.fileno()).st_ino != os.stat(path).st_ino:
            return False
        path.unlink()
        return True


def remove_unheld_dir(path: Path) -> bool:
    lock_path = path / LOCK_NAME
    lock = None
    try:
        lock = open(lock_path, "rb")
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return False
    except FileNotFoundError:
        pass  # a folder from a crash before its lock was made (or an old version): nobody holds it
    try:
        # Move it aside while we hold its lock, so nothing can start using it while it is half removed.
        doomed = path.with_name(f".removing-{path.name}")
        path.rename(doomed)
    finally:
        if lock is not None:
            lock.close()
    remove_tree(doomed)
    return True


def tree_size(root: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def remove_tree(root: Path) -> None:
    """Delete a folder tree even where read-only folders would stop shutil.rmtree."""
    for dirpath, _, _ in os.walk(root):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(dirpath, 0o700)
    shutil.rmtree(root, ignore_errors=False, onerror=_ignore_missing)


def _ignore_missing(func, path, exc_info) -> None:
    if not isinstance(exc_info[1], FileNotFoundError):
        raise exc_info[1]


def reflink(source: Path, dest: Path) -> bool:
    """Clone `source` into a new file `dest` (copy-on-write); False where the file system cannot."""
    with open(source, "rb") as src:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # mode follows the umask
        try:
            fcntl.ioctl(fd, FICLONE, src.fileno())
            return True
        except OSError as exc:
            if exc.errno not in _NO_REFLINK:
                raise
        finally:
            os.close(fd)
    os.unlink(dest)
    return False


def durable_mkdir(path: Path) -> None:
    """mkdir -p, fsyncing each new folder's parent so the new entry survives a power cut."""
    if path.is_dir():
        return
    durable_mkdir(path.parent)
    try:
        path.mkdir()
    except FileExistsError:
        return
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def disk_error(exc: OSError) -> Exception:
    if exc.errno == errno.ENOSPC:
        return DiskFull("disk full while writing to the store; free space (registry gc) and try again")
    return exc
