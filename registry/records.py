"""Artifact records kept in the store, beside the blobs, so a lost catalog can be rebuilt from the store alone.

As OCI registries keep manifests as blobs, each registered artifact's canonical record (name, kind, digest,
files, metadata, provenance, source, parents, creation time) is written as an immutable content-addressed
file, and a small index names the live ones:

    <home>/records/sha256/<2 hex>/<64 hex>   a record (canonical JSON; its name is its sha256)
    <home>/records/artifacts/<sha256(name)>  {"name": ..., "record": <64 hex>} for each live artifact
    <home>/records/tags/<sha256(tag)>        {"tag": ..., "name": ..., "digest": ...}

Index files are replaced atomically (write, fsync, rename, fsync the folder). Records are written only after
the catalog transaction that made the artifact commits, so a rolled-back registration leaves none.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .manifest import canonical_json


def _key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class RecordStore:
    """Artifact records and tags as files under `<home>/records`."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def _record_path(self, sha: str) -> Path:
        return self.root / "sha256" / sha[:2] / sha

    def put(self, record: dict[str, Any]) -> str:
        """Store a record and point the artifact's index entry at it; returns the record's sha256."""
        raw = canonical_json(record)
        sha = hashlib.sha256(raw).hexdigest()
        path = self._record_path(sha)
        if not path.is_file():
            _write_atomic(path, raw)
        _write_atomic(self.root / "artifacts" / _key(record["name"]),
                      canonical_json({"name": record["name"], "record": sha}))
        return sha

    def delete(self, name: str) -> None:
        """Forget a removed artifact (its immutable record file stays; nothing points at it)."""
        (self.root / "artifacts" / _key(name)).unlink(missing_ok=True)

    def put_tag(self, tag: str, name: str, digest: str) -> None:
        """Point a tag at an artifact (by name and digest)."""
        _write_atomic(self.root / "tags" / _key(tag), canonical_json({"tag": tag, "name": name, "digest": digest}))

    def delete_tag(self, tag: str) -> None:
        (self.root / "tags" / _key(tag)).unlink(missing_ok=True)

    def _entries(self, folder: str) -> Iterator[dict[str, Any]]:
        base = self.root / folder
        if not base.is_dir():
            return
        for path in sorted(base.iterdir()):
            if path.name.startswith(".tmp-"):
                continue
            yield json.loads(path.read_bytes())

    def live(self) -> Iterator[tuple[str, dict[str, Any] | None]]:
        """(name, record) for every live artifact; record is None when its file is missing or damaged."""
        for entry in self._entries("artifacts"):
            path = self._record_path(entry["record"])
            try:
                raw = path.read_bytes()
            except FileNotFoundError:
                yield entry["name"], None
                continue
            yield entry["name"], json.loads(raw) if hashlib.sha256(raw).hexdigest() == entry["record"] else None

    def tags(self) -> list[dict[str, Any]]:
        """Every tag entry: {"tag", "name", "digest"}."""
        return list(self._entries("tags"))

    def count(self) -> int:
        """How many live artifacts have a record."""
        base = self.root / "artifacts"
        return sum(1 for p in base.iterdir() if not p.name.startswith(".tmp-")) if base.is_dir() else 0
