"""Materialising artifacts as folders that `from_pretrained` loads: exports and read-only snapshots."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .catalog import resolve
from .core import Registry
from .errors import BadInput, OperationFailed
from .store import materialize


def _files_of(reg: Registry, ref: str) -> tuple[str, list[tuple[str, str, int]]]:
    with reg.session() as s:
        artifact = resolve(s, ref)
        files = [(f.path, f.sha256, f.size) for f in artifact.files]
    for path, sha, size in files:
        blob = reg.store.path(sha)
        if not blob.is_file() or blob.stat().st_size != size:
            raise OperationFailed(f"{artifact.name}: blob for {path} is missing or damaged; "
                                  f"run registry verify {artifact.name}")
    return artifact.digest, files


def _build_tree(reg: Registry, files: list[tuple[str, str, int]], target: Path, copy: bool) -> None:
    for path, sha, _ in files:
        dest = target / path
        dest.parent.mkdir(parents=True, exist_ok=True)
        materialize(reg.store.path(sha), dest, copy)


def export_artifact(reg: Registry, ref: str, dest: str | os.PathLike, copy: bool = False) -> Path:
    """Write the artifact's files to a new folder (hardlinks when possible); nothing is left on failure."""
    dest = Path(dest).absolute()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BadInput(f"{dest} already exists and is not an empty folder; choose a new folder")
    _, files = _files_of(reg, ref)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.partial-"))
    try:
        _build_tree(reg, files, partial, copy)
        if dest.exists():
            dest.rmdir()
        partial.rename(dest)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    os.chmod(dest, 0o755)
    return dest


def snapshot_path(reg: Registry, ref: str) -> Path:
    """A stable read-only folder for the artifact under `<home>/snapshots/<digest>`; made once."""
    digest, files = _files_of(reg, ref)
    final = reg.settings.snapshots_dir / digest.split(":", 1)[1]
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=final.parent, prefix=".partial-"))
    try:
        _build_tree(reg, files, partial, copy=False)
        _make_read_only(partial)
        try:
            partial.rename(final)
        except OSError:
            if not final.is_dir():  # lost a race to an identical snapshot: keep theirs
                raise
    finally:
        if partial.exists():
            remove_tree(partial)
    return final


def _make_read_only(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            os.chmod(Path(dirpath) / name, 0o444)
        os.chmod(dirpath, 0o555)


def remove_tree(root: Path) -> None:
    """Delete a folder tree even where read-only folders would stop shutil.rmtree."""
    for dirpath, _, _ in os.walk(root):
        os.chmod(dirpath, 0o755)
    shutil.rmtree(root)
