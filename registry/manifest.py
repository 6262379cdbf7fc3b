"""Canonical manifests: sorted-key JSON of the kind and the files (path, size, sha256); digest = its sha256.

The digest covers content only, so the same files give the same digest on any machine. Metadata read from
the files and provenance (versions, device, checks, evaluation, times, job) are kept beside it, not in it.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable


MANIFEST_SCHEMA = 2  # 1 also hashed the metadata; migration 0004 recomputed every digest


def build_manifest(kind: str, files: Iterable[tuple[str, int, str]]) -> dict[str, Any]:
    """The manifest for an artifact: `files` are (path, size, sha256) triples."""
    entries = [{"path": p, "size": s, "sha256": h} for p, s, h in sorted(files)]
    return {"schema": MANIFEST_SCHEMA, "kind": kind, "files": entries}


def canonical_json(manifest: dict[str, Any]) -> bytes:
    """The exact bytes that are hashed: sorted keys, no whitespace, UTF-8."""
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def manifest_digest(manifest: dict[str, Any]) -> str:
    """`sha256:<hex>` of the canonical manifest."""
    return "sha256:" + hashlib.sha256(canonical_json(manifest)).hexdigest()


def sha256sum_lines(manifest: dict[str, Any]) -> str:
    """Lines `sha256sum -c` accepts when run inside an exported folder."""
    return "".join(f"{f['sha256']}  {f['path']}\n" for f in manifest["files"])
