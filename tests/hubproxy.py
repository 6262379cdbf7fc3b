"""Test servers for pulls: olah (a real HF mirror) serving local git repos, and a faulty proxy in front of it.

The proxy forwards every request to olah, counts the bytes it sends per file, answers Range requests, and
injects faults on demand: a dropped connection, wrong bytes, a traversal name in the listing, 401/403.
"""
from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
OLAH_BIN = Path(os.environ.get("REGISTRY_TEST_OLAH", ROOT / ".olah-venv" / "bin" / "olah-cli"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True).stdout.strip()


def make_repo(mirrors: Path, repo_id: str, files_from: Path | None = None, lfs: bool = False,
              extra: dict[str, bytes] | None = None) -> Path:
    """A git repository at mirrors/models/<org>/<name> on branch main with a README; returns its folder."""
    repo = mirrors / "models" / repo_id
    repo.mkdir(parents=True)
    git(repo, "init", "-q", "-b", "main")
    if lfs:
        git(repo, "lfs", "install", "--local")
        git(repo, "lfs", "track", "*.safetensors", "*.bin")
    if files_from is not None:
        for f in files_from.iterdir():
            shutil.copy(f, repo / f.name)
    for name, data in (extra or {}).items():
        (repo / name).write_bytes(data)
    (repo / "README.md").write_text(f"# {repo_id}\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "initial")
    return repo


def commit_change(repo: Path, name: str, data: bytes) -> str:
    """Change one file on main; returns the new commit id."""
    (repo / name).write_bytes(data)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", f"update {name}")
    return git(repo, "rev-parse", "HEAD")


class Olah:
    """olah in offline mode serving `mirrors`, in its own virtual environment."""

    def __init__(self, mirrors: Path, workdir: Path):
        if not OLAH_BIN.exists():
            raise RuntimeError(f"olah is not installed at {OLAH_BIN}; run `make test` (it creates .olah-venv)")
        self.port = free_port()
        config = workdir / "olah.toml"
        config.write_text(
            "[basic]\n"
            f'host = "127.0.0.1"\nport = {self.port}\n'
            f'repos-path = "{workdir / "repos"}"\nmirrors-path = ["{mirrors}"]\n'
            f'mirror-netloc = "127.0.0.1:{self.port}"\nmirror-lfs-netloc = "127.0.0.1:{self.port}"\n'
            "metadata-cache-ttl = 0\n"
            "[accessibility]\noffline = true\n")
        self.log = open(workdir / "olah.log", "wb")
        self.proc = subprocess.Popen([str(OLAH_BIN), "-c", str(config)], cwd=workdir, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"olah did not start; see {workdir / 'olah.log'}")
                time.sleep(0.2)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.log.close()


class HubProxy(ThreadingHTTPServer):
    """Forwards to `upstream`, counting and breaking things as told."""

    daemon_threads = True

    def __init__(self, upstream: str):
        super().__init__(("127.0.0.1", free_port()), _Handler)
        self.upstream = urlsplit(upstream)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.reset()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def reset(self) -> None:
        """Forget counts and faults."""
        self.sent: dict[str, int] = defaultdict(int)  # file name -> body bytes sent
        self.requests: list[tuple[str, str, str | None, str | None]] = []  # (method, path, range, auth)
        self.faults: dict[str, str] = {}  # file name -> drop-half | wrong-bytes | wrong-bytes-once | slow | stall
        old = getattr(self, "unstall", None)
        if old is not None:
            old.set()  # let handlers stalled for an earlier test go
        self.unstall = threading.Event()  # "stall" sends 64 KiB, then nothing until this is set (or 60 s pass)
        self.tree_extra: list[dict] = []
        self.ignore_range = False  # answer Range requests with the whole file, as olah does
        self.require_token: str | None = None
        self.forbid_token: str | None = None
        self.status_override: dict[str, tuple[int, dict]] = {}  # url substring -> (status, headers)
        self.lock = threading.Lock()

    def weight_bytes(self) -> int:
        return sum(n for name, n in self.sent.items() if name.endswith((".safetensors", ".bin")))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: HubProxy

    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        self._handle(head=True)

    def do_GET(self) -> None:
        self._handle(head=False)

    def _handle(self, head: bool) -> None:
        srv = self.server
        auth = self.headers.get("authorization")
        with srv.lock:
            srv.requests.append((self.command, self.path, self.headers.get("range"), auth))
        for needle, (status, headers) in srv.status_override.items():
            if needle in self.path:
                return self._reply(status, json.dumps({"error": "x"}).encode(), headers)
        if srv.require_token and auth != f"Bearer {srv.require_token}":
            return self._reply(401, b'{"error": "Invalid credentials"}', {})
        if srv.forbid_token and auth == f"Bearer {srv.forbid_token}":
            return self._reply(403, b'{"error": "Forbidden"}', {})
        status, headers, body = self._forward(head)
        name = self.path.split("/resolve/", 1)[1].split("/", 1)[1] if "/resolve/" in self.path else None
        if "/tree/" in self.path and status == 200 and srv.tree_extra:
            body = json.dumps(json.loads(body) + srv.tree_extra).encode()
        if name is None or head or status != 200:
            return self._reply(status, body, headers)
        self._send_file(name, body, headers)

    def _forward(self, head: bool) -> tuple[int, dict, bytes]:
        up = self.server.upstream
        conn = http.client.HTTPConnection(up.hostname, up.port, timeout=60)
        conn.request(self.command, self.path, headers={"accept": self.headers.get("accept", "*/*")})
        resp = conn.getresponse()
        body = b"" if head else resp.read()
        keep = {k: v for k, v in resp.getheaders()
                if k.lower() not in ("transfer-encoding", "content-length", "connection", "date", "server")}
        if "location" in {k.lower() for k in keep}:  # keep redirects (olah adds trailing slashes) on the proxy
            for k in list(keep):
                if k.lower() == "location":
                    keep[k] = keep[k].replace(f"{up.hostname}:{up.port}", f"127.0.0.1:{self.server.server_address[1]}")
        if head and resp.getheader("content-length"):
            keep["content-length"] = resp.getheader("content-length")
        conn.close()
        return resp.status, keep, body

    def _send_file(self, name: str, body: bytes, headers: dict) -> None:
        srv = self.server
        fault = srv.faults.get(name)
        start = 0
        rng = self.headers.get("range")
        if rng and rng.startswith("bytes=") and not srv.ignore_range:
            start = int(rng[6:].split("-")[0])
        if fault in ("wrong-bytes", "wrong-bytes-once"):
            body = bytes([body[0] ^ 0xFF]) + body[1:]
            if fault == "wrong-bytes-once":
                srv.faults.pop(name)
        part = body[start:]
        self.send_response(206 if start else 200)
        for k, v in headers.items():
            self.send_header(k, v)
        if start:
            self.send_header("content-range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("content-length", str(len(part)))
        self.end_headers()
        if fault == "drop-half":
            srv.faults.pop(name)
            part = part[: len(part) // 2]
            self._write(name, part)
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault == "stall":  # a stuck mirror: the connection stays open, no byte arrives
            if self._write(name, part[:64 * 1024]):
                srv.unstall.wait(60)
                self._write(name, part[64 * 1024:])
            return
        if fault == "slow":
            for i in range(0, len(part), 32 * 1024):
                if not self._write(name, part[i:i + 32 * 1024]):
                    return
                time.sleep(0.02)
            return
        self._write(name, part)

    def _write(self, name: str, data: bytes) -> bool:
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            return False
        with self.server.lock:
            self.server.sent[name] += len(data)
        return True

    def _reply(self, status: int, body: bytes, headers: dict) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
