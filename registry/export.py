"""Materialising artifacts as folders that `from_pretrained` loads: exports and read-only snapshots.

Each file is a reflink (a copy-on-write clone: an independent file that costs no space, on btrfs or xfs)
where the file system can, else a hardlink to the store's blob (shares its inode: read-only, and its mode
and times are the store's), else a copy. `--copy` never hardlinks. New folders and copies follow the umask.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

from .catalog import load, require_usable
from .core import Registry
from .errors import BadInput, DiskFull, OperationFailed
from .folder import check_relative_path
from .store import current_umask


def _files_of(reg: Registry, ref: str | int) -> tuple[str, list[tuple[str, str, int]]]:
    """(digest, files) of a usable artifact, named by ref or by id (never re-resolved from a digest)."""
    with reg.session() as s:
        artifact = require_usable(load(s, ref))
        files = [(f.path, f.sha256, f.size) for f in artifact.files]
    for path, sha, size in files:
        try:
            check_relative_path(path)  # the catalog may come from elsewhere: never write outside the folder
        except BadInput:
            raise OperationFailed(f"{artifact.name}: the catalog lists an unsafe file name {path!r}; nothing was "
                                  "written (check the catalog with registry fsck)") from None
        if reg.store.size(sha) != size:
            raise OperationFailed(f"{artifact.name}: blob for {path} is missing or damaged; "
                                  f"run registry verify {artifact.name}")
    return artifact.digest, files


def _build_tree(reg: Registry, files: list[tuple[str, str, int]], target: Path, how: str) -> None:
    root = target.resolve()
    for path, sha, _ in files:
        dest = target / path
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.parent.resolve().is_relative_to(root):  # a folder we made cannot hold a symlink; still check
            raise OperationFailed(f"refusing to write {path!r} outside {target}")
        reg.store.materialize(sha, dest, how)


def export_artifact(reg: Registry, ref: str | int, dest: str | os.PathLike, copy: bool = False) -> Path:
    """Write the artifact's files to a new folder (hardlinks when possible); nothing is left on failure."""
    dest = Path(dest).absolute()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BadInput(f"{dest} already exists and is not an empty folder; choose a new folder")
    _, files = _files_of(reg, ref)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.partial-"))
    except OSError as exc:  # a read-only or special file system, a parent that is a file, no permission
        if exc.errno == errno.ENOSPC:
            raise DiskFull(f"disk full while creating {dest}; free space and try again") from None
        reason = "a parent is not a folder" if exc.errno in (errno.EEXIST, errno.ENOTDIR) else exc.strerror or exc
        raise BadInput(f"cannot create {dest}: {reason}; choose a folder you can write") from None
    try:
        _build_tree(reg, files, partial, "copy" if copy else "auto")
        os.chmod(partial, 0o777 & ~current_umask())  # mkdtemp made it private; the export follows the umask
        if dest.exists():
            dest.rmdir()
        partial.rename(dest)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return dest


def snapshot_path(reg: Registry, ref: str | int) -> Path:
    """A stable read-only folder for the artifact under `<home>/snapshots/<digest>`; made once."""
    digest, files = _files_of(reg, ref)
    final = reg.settings.snapshots_dir / digest.split(":", 1)[1]
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    # Built in a scratch folder that gc knows is in use, then renamed into place in one step.
    with reg.store.scratch_dir("snapshot") as scratch:
        partial = scratch / "tree"
        partial.mkdir()
        _build_tree(reg, files, partial, "link")
        _make_read_only(partial)
        try:
            partial.rename(final)
        except OSError:
            if not final.is_dir():  # lost a race to an identical snapshot: keep theirs
                raise
    return final


def _make_read_only(root: Path) -> None:
    dir_mode = 0o555 & ~current_umask()
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            path = Path(dirpath) / name
            mode = path.stat().st_mode & 0o777
            if mode & 0o222:  # a copy; a hardlink is the store's read-only blob, whose mode stays as it is
                os.chmod(path, mode & ~0o222)
        os.chmod(dirpath, dir_mode)
