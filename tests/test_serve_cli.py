"""`registry serve` as a command: it starts, serves with tokens, logs no secrets, stops on SIGTERM, and refuses a
port in use. The routes themselves are tested in-process (test_serve_hf, test_serve_api, test_serve_web)."""
from __future__ import annotations

import signal
import socket
import subprocess
import time

import httpx
import pytest

from conftest import REGISTRY_BIN, run_cli
from serving import make_token

both_backends = pytest.mark.parametrize("home", ["sqlite", "postgresql"], indirect=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(*args: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([REGISTRY_BIN, "serve", "--port", str(port), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(f"{url}/v1/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("registry serve did not answer /v1/health within 30 s")


def _stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=20)
    # uvicorn finishes the requests in flight, then re-raises the signal: killed by SIGTERM, as systemd expects.
    assert proc.returncode == -signal.SIGTERM and "Finished server process" in out, out
    return out


@both_backends
def test_serve_needs_a_token_logs_none_and_stops_on_sigterm(home, tiny_model):
    run_cli("import", str(tiny_model), "--name", "acme/tiny")
    token = make_token(role="read")
    proc, url = _start()
    try:
        assert httpx.get(f"{url}/v1/artifacts").status_code == 401
        auth = {"authorization": f"Bearer {token}"}
        listed = httpx.get(f"{url}/v1/artifacts", headers=auth).json()
        assert [a["name"] for a in listed["items"]] == ["acme/tiny"]
        info = httpx.get(f"{url}/api/models/acme/tiny", headers=auth).json()
        assert info["id"] == "acme/tiny"
        assert httpx.get(f"{url}/v1/artifacts", headers={"authorization": "Bearer rgt_wrong"}).status_code == 401
    finally:
        out = _stop(proc)
    assert "GET /v1/artifacts" in out  # the access log is on ...
    assert token not in out and "rgt_wrong" not in out  # ... and never carries a token


@both_backends
def test_anonymous_read_lets_clients_browse_without_a_token(home, tiny_model):
    run_cli("import", str(tiny_model), "--name", "acme/tiny")
    proc, url = _start("--allow-anonymous-read")
    try:
        assert httpx.get(f"{url}/api/models/acme/tiny").json()["id"] == "acme/tiny"
        refused = httpx.put(f"{url}/v1/tags/acme/tiny:prod", json={"ref": "acme/tiny"})
        assert refused.status_code == 401 and refused.json()["error"]["exit_code"] == 4
    finally:
        _stop(proc)


def test_a_port_in_use_is_one_line_and_exit_2(home):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_cli("serve", "--port", str(port), check=2)
    assert proc.stderr.strip().splitlines() == [f"error: port {port} on 127.0.0.1 is in use; stop what listens "
                                                "there or choose --port"]


@pytest.mark.parametrize("home", ["postgresql"], indirect=True)
def test_several_server_processes_share_one_postgresql_catalog(home, tiny_model):
    """--workers 2: two server processes on one socket, as behind a load balancer; a tag moved through one of
    them is what every request sees next, whichever process answers."""
    from conftest import import_here

    import_here(tiny_model, "acme/tiny")
    writer = make_token(role="write")
    proc, url = _start("--workers", "2")
    try:
        auth = {"authorization": f"Bearer {writer}"}
        assert httpx.put(f"{url}/v1/tags/acme/tiny:prod", json={"ref": "acme/tiny"}, headers=auth).status_code == 200
        for _ in range(6):  # a new connection each time: the kernel spreads them over both processes
            info = httpx.get(f"{url}/api/models/acme/tiny/revision/prod", headers=auth).json()
            assert info["id"] == "acme/tiny"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert out.count("Started server process") == 2, out
    assert "Traceback" not in out, out
