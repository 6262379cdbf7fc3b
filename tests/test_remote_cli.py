"""The CLI against a catalog server (issue 11 item 5): with REGISTRY_URL (and REGISTRY_TOKEN) set, list, show,
manifest, jobs, job, tag, cancel, rm and the job commands talk to `registry serve`'s /v1 API, print what they
print against a local catalog, and exit with the same codes; what a server cannot do for this machine is one
line and exit 2.

The server runs in a thread of the test process (tests/serving.py) and, where a command waits for its job, a
worker thread runs the queue; most commands run in-process through the console entry point (a CLI process
costs about a second), and one runs as the real `registry` process.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sys
import threading

import pytest

from conftest import import_here, run_cli, tag_here, write_safetensors_header
from serving import make_token, serve_in_thread

both_backends = pytest.mark.parametrize("home", ["sqlite", "postgresql"], indirect=True)


def _model(folder, size: int = 64):
    """A small model folder (no torch needed)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "size": size}))
    write_safetensors_header(folder / "model.safetensors", {"w": {"dtype": "F32", "shape": [size],
                                                                  "data_offsets": [0, 4 * size]}}, 4 * size)
    return folder


class Cli:
    """`registry ARGS` run in this process through the console entry point, as a user's shell would see it."""

    def __init__(self, capsys, monkeypatch):
        self.capsys, self.monkeypatch = capsys, monkeypatch

    def __call__(self, *args: str, code: int = 0, env: dict | None = None) -> tuple[str, str]:
        from registry.cli import main

        with self.monkeypatch.context() as m:
            for key, value in (env or {}).items():
                m.delenv(key, raising=False) if value is None else m.setenv(key, value)
            m.setattr(sys, "argv", ["registry", *args])
            self.capsys.readouterr()
            try:
                main()
                got = 0
            except SystemExit as exc:
                got = exc.code or 0
        out, err = self.capsys.readouterr()
        assert got == code, f"registry {' '.join(args)}: exit {got}\nstdout:\n{out}\nstderr:\n{err}"
        return out, err

    def error(self, *args: str, code: int, env: dict | None = None) -> str:
        """The one `error: ...` line of a refused command (and nothing on stdout)."""
        out, err = self(*args, code=code, env=env)
        lines = err.strip().splitlines()
        assert out == "" and len(lines) == 1 and lines[0].startswith("error: "), err
        return lines[0]


@pytest.fixture
def cli(capsys, monkeypatch):
    return Cli(capsys, monkeypatch)


@contextlib.contextmanager
def worker_thread(reg):
    """A worker for the server's queue in a thread (what `registry worker` runs beside `registry serve`)."""
    from registry import jobs
    from registry.workers import run_job

    stop = threading.Event()
    owner = jobs.worker_id()

    def loop():
        while not stop.is_set():
            with reg.session() as s:
                job = jobs.claim(s, owner, 60)
                job_id = job.id if job else None
            if job_id is None:
                stop.wait(0.05)
            else:
                run_job(reg, job_id, owner, 60)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(30)


class Served:
    reg: object
    url: str
    local: dict  # the environment that runs a command on the served catalog itself (REGISTRY_URL unset)


@pytest.fixture
def server(home, tmp_path, monkeypatch):
    """A served catalog holding `tiny` (tagged tiny:prod) and `twin`, and REGISTRY_URL with a read token. The
    test's own REGISTRY_HOME then points at an empty folder and no database URL, so a command that used a local
    catalog instead of the server would find nothing (and create that folder)."""
    from registry import Registry

    s = Served()
    s.reg = Registry()
    s.reg.init()
    import_here(_model(tmp_path / "tiny"), "tiny")
    import_here(_model(tmp_path / "twin", 32), "twin")
    tag_here("tiny", "tiny:prod")
    s.local = {"REGISTRY_URL": None, "REGISTRY_HOME": str(home),
               "REGISTRY_DATABASE_URL": os.environ.get("REGISTRY_DATABASE_URL")}
    with serve_in_thread(s.reg) as s.url:
        monkeypatch.setenv("REGISTRY_HOME", str(tmp_path / "laptop"))
        monkeypatch.delenv("REGISTRY_DATABASE_URL", raising=False)
        monkeypatch.setenv("REGISTRY_URL", s.url)
        monkeypatch.setenv("REGISTRY_TOKEN", make_token(s.reg, "read", "laptop"))
        yield s
    assert not (tmp_path / "laptop").exists()  # nothing ran on a local catalog


# --- reads: the same text and JSON as the local commands ---

@both_backends
def test_read_commands_print_what_the_local_ones_print(server, cli):
    local = server.local
    job_id = json.loads(cli("verify", "tiny", "--json", env=local)[0])["job"]
    for args in (["list"], ["list", "--json"], ["list", "--kind", "adapter"], ["show", "tiny"],
                 ["show", "tiny:prod", "--json"], ["manifest", "tiny"], ["manifest", "tiny", "--format", "sha256sum"],
                 ["manifest", "tiny", "--json"], ["jobs"], ["jobs", "--json", "--limit", "1"], ["job", str(job_id)],
                 ["job", str(job_id), "--json"]):
        assert cli(*args) == cli(*args, env=local), args
    assert "tiny:prod" in cli("list")[0] and "twin" in cli("list")[0]


@both_backends
def test_not_found_and_refused_tokens_exit_like_local(server, cli):
    url = server.url
    assert cli.error("show", "nope", code=3) == "error: no artifact, tag or digest named 'nope'; see registry list"
    assert cli.error("job", "999", code=3) == "error: no job 999; see registry jobs"
    line = cli.error("list", code=4, env={"REGISTRY_TOKEN": None})
    assert line == f"error: {url} needs a token: set REGISTRY_TOKEN (its admin makes one with " \
                   "`registry token create NAME --role read`)"
    line = cli.error("list", code=4, env={"REGISTRY_TOKEN": "rgt_not-a-token"})
    assert line.startswith(f"error: {url} refused REGISTRY_TOKEN: unknown or revoked token") and "rgt_" not in line
    assert cli.error("tag", "tiny", "tiny:x", code=4) == \
        "error: this needs a write token; token 'laptop' has the read role"


@both_backends
def test_tag_rm_and_cancel_change_the_servers_catalog(server, cli):
    write = {"REGISTRY_TOKEN": make_token(server.reg, "write")}
    assert cli("tag", "twin", "tiny:prod", env=write)[0].startswith("tiny:prod -> twin sha256:")
    assert "(moved from sha256:" in cli("tag", "tiny", "tiny:prod", env=write)[0]
    queued = json.loads(cli("verify", "twin", "--detach", "--json", env=write)[0])["job"]
    assert cli("cancel", str(queued), env=write)[0] == f"job {queued} cancelled before it ran\n"
    assert cli("cancel", str(queued), env=write)[0] == f"job {queued} already cancelled; nothing to cancel\n"
    assert re.match(r"error: this needs an? admin token; token 'write-\d+' has the write role$",
                    cli.error("rm", "twin", code=4, env=write))
    admin = {"REGISTRY_TOKEN": make_token(server.reg, "admin")}
    out = cli("rm", "tiny", env=admin)[0]
    assert out.startswith("removed tiny sha256:") and "and its tags tiny:prod; run registry gc" in out
    assert "tiny" not in cli("list")[0].split()
    with worker_thread(server.reg):  # gc runs as a job on the server; config.json is twin's too
        assert re.match(r"freed \d+ B \(\d+ bytes\): 2 blobs, 0 temporary files, 0 snapshots\n$",
                        cli("gc", env=admin)[0])
    assert cli.error("gc", "--dry-run", code=2, env=admin).startswith("error: gc --dry-run is not offered by a")


# --- jobs: submitted, waited for, printed as locally ---

@both_backends
def test_verify_and_repair_wait_for_the_servers_worker(server, cli):
    reg = server.reg
    write = {"REGISTRY_TOKEN": make_token(reg, "write")}
    with worker_thread(reg):
        out = cli("verify", "tiny", env=write)[0]
        assert out.startswith("tiny sha256:") and ": ok (" in out and "ok          model.safetensors" in out
        blob = _blob(reg, "tiny", "tokenizer.json")
        os.chmod(blob, 0o644)
        blob.write_text("damaged")
        out, err = cli("verify", "tiny", env=write, code=1)
        assert "FAILED" in out and "WRONG SIZE  tokenizer.json" in out
        out = cli("repair", "tiny", env=write)[0]
        assert "restored    tokenizer.json" in out and "tiny is ready" in out
        result = json.loads(cli("verify", "tiny", "twin", "--json", env=write)[0])
        assert result["ok"] and [a["name"] for a in result["artifacts"]] == ["tiny", "twin"]
    out = cli("verify", "--all", "--detach", env=write)[0]
    assert out.startswith("queued job ") and "; watch it with: registry job " in out


def _blob(reg, artifact: str, path: str):
    from registry.catalog import resolve

    with reg.read_session() as s:
        sha = {f.path: f.sha256 for f in resolve(s, artifact).files}[path]
    return reg.home / "blobs" / "sha256" / sha[:2] / sha


@both_backends
def test_job_submission_errors_come_back_with_their_exit_codes(server, cli):
    write = {"REGISTRY_TOKEN": make_token(server.reg, "write")}
    assert cli.error("verify", "nope", code=3, env=write) == \
        "error: no artifact, tag or digest named 'nope'; see registry list"
    assert cli.error("merge", "nope", "tiny", code=3, env=write).startswith("error: no artifact")
    assert "bits" in cli.error("quantize", "tiny", "--bits", "5", code=2, env=write)  # the server's 422
    assert cli.error("verify", "tiny", code=4).startswith("error: this needs a write token")


# --- what a server cannot do for this machine (no catalog is reached) ---

@pytest.fixture
def laptop(tmp_path, monkeypatch):
    """REGISTRY_URL at a port nobody listens on, and a local home that must stay uncreated."""
    monkeypatch.setenv("REGISTRY_HOME", str(tmp_path / "laptop"))
    monkeypatch.delenv("REGISTRY_DATABASE_URL", raising=False)
    monkeypatch.setenv("REGISTRY_URL", "http://127.0.0.1:9")
    yield
    assert not (tmp_path / "laptop").exists()


@pytest.mark.parametrize("args, says", [
    (["quantize", "tiny", "--calibration", "chats.jsonl"], "--calibration chats.jsonl is a path on this machine"),
    (["pull", "org/model", "--token-file", "t.txt"], "--token-file t.txt is a path on this machine"),
    (["repair", "tiny", "--from", "/backup/tiny"], "--from /backup/tiny is a path on this machine"),
    (["import", "./x", "--name", "x"], "registry import reads files on this machine"),
    (["export", "tiny", "./out"], "registry export writes from a local store"),
    (["path", "tiny"], "registry path names a folder in a local store"),
    (["link", "a", "b"], "registry link is not offered by a catalog server"),
    (["verify", "--upstream", "tiny"], "verify --upstream compares a local registry with the hub"),
    (["merge", "a", "b", "--allow-pickle"], "merge --allow-pickle is not accepted by a catalog server"),
    (["generate", "tiny", "--prompt", "hi"], "registry generate runs a model from a local store"),
])
def test_what_the_server_cannot_do_here_is_refused(laptop, cli, args, says):
    line = cli.error(*args, code=2)
    assert line.startswith(f"error: {says}") and "REGISTRY_URL" in line


def test_unreachable_or_malformed_registry_url(laptop, cli, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("REGISTRY_URL", f"http://127.0.0.1:{port}")
    line = cli.error("list", code=1)
    assert line == f"error: cannot reach REGISTRY_URL http://127.0.0.1:{port}: connection refused; " \
                   "check that `registry serve` runs there"
    monkeypatch.setenv("REGISTRY_URL", "models.team:8000")
    assert cli.error("jobs", code=2) == "error: REGISTRY_URL 'models.team:8000' is not a catalog server URL; " \
                                        "use e.g. http://models.team:8000"
    # As with hub tokens: never over plain http to another host, unless the user says the network is trusted.
    monkeypatch.setenv("REGISTRY_URL", "http://models.team:8000")
    monkeypatch.setenv("REGISTRY_TOKEN", "rgt_secret")
    line = cli.error("jobs", code=2)
    assert line == "error: refusing to send REGISTRY_TOKEN over plain http to models.team; use an https URL (a TLS " \
                   "proxy in front of registry serve), or set REGISTRY_ALLOW_HTTP_TOKEN=1 on a network you trust"


# --- the real command, once ---

@both_backends
def test_the_registry_command_never_prints_the_token(server):
    token = make_token(server.reg, "write")
    env = {"REGISTRY_TOKEN": token, "REGISTRY_DEBUG": "1"}
    proc = run_cli("tag", "twin", "twin:stable", env=env)
    assert proc.stdout.startswith("twin:stable -> twin sha256:")
    proc = run_cli("show", "nope", env=env, check=3)
    assert proc.stderr.strip().splitlines()[-1] == "error: no artifact, tag or digest named 'nope'; see registry list"
    assert token not in proc.stdout + proc.stderr
