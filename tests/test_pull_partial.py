"""A pull killed after the last write of a file (during the final fsync) leaves a complete `.part`: the next
pull checks it without any request (issue 8, item 7)."""
from __future__ import annotations

import hashlib

from conftest import cli_json, run_cli
from registry import Registry
from conftest import _random_safetensors  # the hub and hubp fixtures (olah behind a proxy) are in conftest


def _partial_path(content: bytes):
    """Where a pull keeps its partial download of this (non-LFS) content, through the store's interface."""
    git_sha1 = hashlib.sha1(f"blob {len(content)}\0".encode() + content).hexdigest()
    return Registry().store.partial(f"git-{git_sha1}").path


def _gets(proxy, name: str) -> list:
    return [r for r in proxy.requests if r[0] == "GET" and r[1].endswith(f"/{name}")]


def test_a_complete_partial_is_checked_without_a_request(hubp, home):
    content = _random_safetensors(1, 3)
    part = _partial_path(content)
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(content)  # the kill came after the last write, before the rename
    out = cli_json("pull", "acme/big")
    assert _gets(hubp.proxy, "model.safetensors") == []
    assert "model.safetensors" not in hubp.proxy.sent
    assert out["bytes_reread"] == len(content) and out["bytes_downloaded"] < 1000
    assert not part.exists()
    run_cli("verify", "acme/big")


def test_a_full_size_partial_with_wrong_content_is_downloaded_again(hubp, home):
    content = _random_safetensors(1, 3)
    part = _partial_path(content)
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(bytes([content[0] ^ 0xFF]) + content[1:])
    cli_json("pull", "acme/big")
    assert [r[2] for r in _gets(hubp.proxy, "model.safetensors")] == [None]  # one plain GET from the start
    assert hubp.proxy.sent["model.safetensors"] == len(content)
    run_cli("verify", "acme/big")
