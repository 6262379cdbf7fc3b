"""Test helpers for `registry serve`: a real uvicorn on 127.0.0.1 in a thread of the test process, and tokens.

In a thread rather than a subprocess: a server starts in milliseconds instead of a second or two of imports,
and the test can change the catalog between requests with library calls. `registry serve` itself (the command)
is tested as a subprocess once.
"""
from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Iterator

import uvicorn

from registry import Registry
from registry.server import create_app


@contextlib.contextmanager
def serve_in_thread(reg: Registry | None = None, anonymous: bool = False) -> Iterator[str]:
    """Serve `reg` (default: Registry() from REGISTRY_HOME/REGISTRY_DATABASE_URL) on a free port; yields the URL."""
    reg = reg or Registry()
    reg.init()
    app = create_app(reg, allow_anonymous_read=anonymous)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as registry serve does (cli/serve.py says why)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def make_token(reg: Registry | None = None, role: str = "read", name: str | None = None) -> str:
    """A new token with this role (named after the role and a counter unless `name`); returns the secret."""
    from registry.tokens import create_token

    global _counter
    _counter += 1
    with (reg or Registry()).session() as s:
        _, secret = create_token(s, name or f"{role}-{_counter}", role)
    return secret


_counter = 0
