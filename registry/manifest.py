"""Canonical manifests: sorted-key JSON of files (path, size, sha256) and metadata; digest = its sha256."""
from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable


def build_manifest(kind: str, files: Iterable[tuple[str, int, str]], meta: dict[str, Any]) -> dict[str, Any]:
    """The manifest for an artifact: `files` are (path, size, sha256) triples."""
    entries = [{"path": p, "size": s, "sha256": h} for p, s, h in sorted(files)]
    return {"schema": 1, "kind": kind, "files": entries, "metadata": meta}


def canonical_json(manifest: dict[str, Any]) -> bytes:
    """The exact bytes that are hashed: sorted keys, no whitespace, UTF-8."""
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def manifest_digest(manifest: dict[str, Any]) -> str:
    """`sha256:<hex>` of the canonical manifest."""
    return "sha256:" + hashlib.sha256(canonical_json(manifest)).hexdigest()


def sha256sum_lines(manifest: dict[str, Any]) -> str:
    """Lines `sha256sum -c` accepts when run inside an exported folder."""
    return "".join(f"{f['sha256']}  {f['path']}\n" for f in manifest["files"])
