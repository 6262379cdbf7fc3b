"""A fast, minimal HF-compatible file server for benchmarks: the hub API calls that model_info,
list_repo_tree, hf_hub_download and snapshot_download make, answered from a local folder with sendfile.

    python bench/hfserver.py ROOT [--port N]      # serves ROOT/<org>/<name>/<files> at one fixed commit

Safetensors files are listed as LFS files (with their sha256); the rest as plain git blobs (sha1 ids).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


def describe(repo: Path) -> dict:
    """Per-file size, git blob id and (for LFS-style files) sha256; plus a commit id for the repo."""
    files = {}
    for path in sorted(p for p in repo.rglob("*") if p.is_file()):
        rel = path.relative_to(repo).as_posix()
        size = path.stat().st_size
        lfs = rel.endswith(".safetensors")
        sha256 = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(8 << 20), b""):
                sha256.update(chunk)
        if lfs:
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256.hexdigest()}\nsize {size}\n"
            git = hashlib.sha1(f"blob {len(pointer)}\0{pointer}".encode()).hexdigest()
        else:
            data = path.read_bytes()
            git = hashlib.sha1(f"blob {size}\0".encode() + data).hexdigest()
        files[rel] = {"path": path, "size": size, "oid": git, "sha256": sha256.hexdigest() if lfs else None}
    commit = hashlib.sha1(json.dumps({k: v["oid"] for k, v in files.items()}).encode()).hexdigest()
    return {"commit": commit, "files": files}


class RateLimit:
    """One token bucket shared by all connections: the server's total bandwidth, like a network link."""

    def __init__(self, bytes_per_second: float):
        self.rate, self.lock, self.next_free = bytes_per_second, threading.Lock(), time.monotonic()

    def take(self, n: int) -> None:
        if not self.rate:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_free)
            self.next_free = start + n / self.rate
        time.sleep(max(0.0, self.next_free - now))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    repos: dict[str, dict] = {}
    limit = RateLimit(0)

    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        self.route(head=True)

    def do_GET(self) -> None:
        self.route(head=False)

    def route(self, head: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        m = re.match(r"^/api/models/([^/]+/[^/]+)(?:/revision/[^/]+)?/?$", path)
        if m and m.group(1) in self.repos:
            repo = self.repos[m.group(1)]
            return self.json({"id": m.group(1), "modelId": m.group(1), "sha": repo["commit"], "private": False,
                              "siblings": [{"rfilename": r} for r in repo["files"]]}, head)
        m = re.match(r"^/api/models/([^/]+/[^/]+)/tree/[^/]+/?$", path)
        if m and m.group(1) in self.repos:
            entries = []
            for rel, f in self.repos[m.group(1)]["files"].items():
                entry = {"type": "file", "oid": f["oid"], "size": f["size"], "path": rel}
                if f["sha256"]:
                    entry["lfs"] = {"oid": f["sha256"], "size": f["size"], "pointerSize": 134}
                entries.append(entry)
            return self.json(entries, head)
        m = re.match(r"^/([^/]+/[^/]+)/resolve/[^/]+/(.+)$", path)
        if m and m.group(1) in self.repos and m.group(2) in self.repos[m.group(1)]["files"]:
            return self.file(self.repos[m.group(1)], self.repos[m.group(1)]["files"][m.group(2)], head)
        self.send_response(404)
        self.send_header("x-error-code", "EntryNotFound")
        self.send_header("content-length", "0")
        self.end_headers()

    def json(self, data, head: bool) -> None:
        body = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def file(self, repo: dict, f: dict, head: bool) -> None:
        start = 0
        rng = self.headers.get("range")
        if rng and rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0])
        self.send_response(206 if start else 200)
        self.send_header("x-repo-commit", repo["commit"])
        etag = f["sha256"] or f["oid"]
        self.send_header("etag", f'"{etag}"')
        if f["sha256"]:
            self.send_header("x-linked-etag", f'"{f["sha256"]}"')
            self.send_header("x-linked-size", str(f["size"]))
        self.send_header("accept-ranges", "bytes")
        if start:
            self.send_header("content-range", f"bytes {start}-{f['size'] - 1}/{f['size']}")
        self.send_header("content-length", str(f["size"] - start))
        self.end_headers()
        if head:
            return
        with open(f["path"], "rb") as fh:
            self.wfile.flush()
            offset, chunk = start, 1 << 20
            while offset < f["size"]:
                n = min(chunk, f["size"] - offset)
                self.limit.take(n)
                self.connection.sendfile(fh, offset=offset, count=n)
                offset += n


def serve(root: Path, port: int = 0, rate_mb: float = 0) -> tuple[ThreadingHTTPServer, str]:
    """Start the server in a thread (total bandwidth `rate_mb` MB/s, 0: unlimited); returns (server, URL)."""
    Handler.limit = RateLimit(rate_mb * 1e6)
    Handler.repos = {f"{org.name}/{repo.name}": describe(repo)
                     for org in sorted(root.iterdir()) if org.is_dir()
                     for repo in sorted(org.iterdir()) if repo.is_dir()}
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", type=Path)
    parser.add_argument("--port", type=int, default=8095)
    parser.add_argument("--rate", type=float, default=0, help="total MB/s (0: unlimited)")
    args = parser.parse_args()
    server, url = serve(args.root, args.port, args.rate)
    print(url, flush=True)
    threading.Event().wait()
