"""Tokens and trusted endpoints come from the worker's configuration, never from job parameters (issue 8,
item 10), and `verify --upstream --all` checks every pulled artifact (item 14).

A "capture" server is a second counting proxy in front of olah, on its own port: it records every request
with its Authorization header, so a test can tell whether a token was sent there.
"""
from __future__ import annotations

import json
import os

import pytest
from sqlalchemy import select

from conftest import cli_json, run_cli
from hubproxy import HubProxy
from registry import Registry, jobs
from registry.models import Job

WORKER_TOKEN = "hf_WORKERsecret0123456789"
MIRROR_TOKEN = "hf_MIRRORtoken0123456789"


@pytest.fixture
def capture(hubp):
    """A second endpoint (a recording proxy in front of the same olah) that nothing trusts by default."""
    proxy = HubProxy(hubp.olah.url)
    yield proxy
    proxy.shutdown()


def _write_config(home, text: str):
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(text)


def _auth_headers(proxy: HubProxy) -> set:
    """Authorization headers seen, leaving out huggingface_hub's own anonymous /api/agent-harnesses probe."""
    return {r[3] for r in proxy.requests if not r[1].startswith("/api/agent-harnesses")}


def test_worker_refuses_an_untrusted_endpoint_and_never_sends_its_token(hubp, capture, db_url, home, tmp_path):
    # Someone queues a pull naming their own server (no token of theirs involved).
    queued = cli_json("pull", "acme/big", "--endpoint", capture.url, "--detach", env={"HF_TOKEN": ""})
    assert None in _auth_headers(capture) and len(_auth_headers(capture)) == 1
    # A hostile client that writes params itself: a token_file naming the worker's own secret.
    secret_file = tmp_path / "worker.token"
    secret_file.write_text(WORKER_TOKEN)
    with Registry().session() as s:
        hostile, _ = jobs.enqueue(s, "pull", {"repo_id": "acme/tiny", "revision": "main", "commit": hubp.second,
                                              "endpoint": capture.url, "token_file": str(secret_file)}, "hostile")
        hostile_id = hostile.id
    capture.reset()
    run_cli("worker", "--once", env={"HF_TOKEN": WORKER_TOKEN})
    assert capture.requests == []  # refused before any request: the token never left the worker
    for job_id in (queued["job"], hostile_id):
        job = cli_json("job", str(job_id))
        assert (job["state"], job["exit_code"], job["attempts"]) == ("failed", 2, 1)
        assert f"endpoint {capture.url} is not trusted by this worker" in job["error"]
        assert "[[endpoints]]" in job["error"] and str(home / "config.toml") in job["error"]
    assert cli_json("list") == []


def test_endpoint_allowed_in_config_gets_its_configured_token(hubp, capture, db_url, home, tmp_path):
    queued = cli_json("pull", "acme/big", "--endpoint", capture.url, "--detach", env={"HF_TOKEN": ""})
    token_file = tmp_path / "mirror.token"
    token_file.write_text(MIRROR_TOKEN + "\n")
    _write_config(home, f'[[endpoints]]\nurl = "{capture.url}/"\ntoken_file = "{token_file}"\n')
    capture.reset()
    capture.require_token = MIRROR_TOKEN
    run_cli("worker", "--once", env={"HF_TOKEN": WORKER_TOKEN})
    assert cli_json("job", str(queued["job"]))["state"] == "succeeded"
    assert capture.requests and _auth_headers(capture) == {f"Bearer {MIRROR_TOKEN}"}
    assert cli_json("show", "acme/big")["source"]["endpoint"] == capture.url
    # token_env works the same way; the worker's HF_TOKEN still never goes there.
    run_cli("rm", "acme/big")
    _write_config(home, f'[[endpoints]]\nurl = "{capture.url}"\ntoken_env = "MIRROR_TOKEN"\n')
    capture.reset()
    capture.require_token = MIRROR_TOKEN
    cli_json("pull", "acme/big", "--endpoint", capture.url, "--name", "big2", "--detach",
             env={"MIRROR_TOKEN": MIRROR_TOKEN})
    run_cli("worker", "--once", env={"HF_TOKEN": WORKER_TOKEN, "MIRROR_TOKEN": MIRROR_TOKEN})
    assert cli_json("show", "big2")["status"] == "ready"
    assert _auth_headers(capture) == {f"Bearer {MIRROR_TOKEN}"}


def test_detached_params_hold_no_token_and_no_token_file(hubp, db_url, home, tmp_path):
    token = "hf_DETACHEDtoken0123456789"
    token_file = tmp_path / "my-token-file"
    token_file.write_text(token)
    hubp.proxy.require_token = token
    proc = run_cli("pull", "acme/big", "--token-file", str(token_file), "--detach")
    assert "--token-file is used by this command only" in proc.stderr
    with Registry().session() as s:
        stored = json.dumps([[j.params, j.dedup_key] for j in s.scalars(select(Job))])
    assert "acme/big" in stored
    assert token not in stored and str(token_file) not in stored and "my-token-file" not in stored
    if db_url.startswith("sqlite"):
        for path in home.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                assert token.encode() not in data and b"my-token-file" not in data, path
    # The in-process run (no --detach) uses the token the user gave, and still stores none of it.
    cli_json("pull", "acme/big", "--token-file", str(token_file))
    assert _auth_headers(hubp.proxy) == {f"Bearer {token}"}
    with Registry().session() as s:
        stored = json.dumps([[j.params, j.dedup_key, j.result] for j in s.scalars(select(Job))])
    assert token not in stored and "my-token-file" not in stored


def test_verify_upstream_sends_no_token_to_an_untrusted_stored_endpoint(hubp, capture, db_url):
    run_cli("pull", "acme/moving", "--endpoint", capture.url, env={"HF_TOKEN": ""})
    capture.reset()
    out = run_cli("verify", "--upstream", "acme/moving", env={"HF_TOKEN": WORKER_TOKEN}).stdout
    assert "matches the hub" in out
    assert capture.requests and _auth_headers(capture) == {None}
    # Needing a token there: the error says none was sent, and how to trust the endpoint.
    capture.require_token = WORKER_TOKEN
    proc = run_cli("verify", "--upstream", "acme/moving", env={"HF_TOKEN": WORKER_TOKEN}, check=1)
    assert f"No token was sent: {capture.url} is not a trusted endpoint" in proc.stderr
    assert f"--endpoint {capture.url}" in proc.stderr
    # Named on the command line, it is trusted for that command.
    capture.reset()
    capture.require_token = WORKER_TOKEN
    run_cli("verify", "--upstream", "acme/moving", "--endpoint", capture.url, env={"HF_TOKEN": WORKER_TOKEN})
    assert _auth_headers(capture) == {f"Bearer {WORKER_TOKEN}"}


def test_verify_upstream_all_checks_every_pulled_artifact(hubp, db_url, home, tiny_model):
    run_cli("pull", "acme/tiny")
    run_cli("pull", "acme/moving")
    run_cli("import", str(tiny_model), "--name", "local")
    report = json.loads(run_cli("verify", "--upstream", "--all", "--json").stdout)
    assert {r["name"]: r["status"] for r in report} == {"acme/tiny": "ok", "acme/moving": "ok", "local": "skipped"}
    assert all(r["files"] for r in report if r["status"] == "ok")
    text = run_cli("verify", "--upstream", "--all").stdout
    assert "local: skipped" in text and "3 artifacts: 2 ok, 0 differs, 0 error, 1 skipped" in text
    sha = {f["path"]: f["sha256"] for f in cli_json("show", "acme/moving")["file_list"]}["config.json"]
    blob = home / "blobs" / "sha256" / sha[:2] / sha
    os.chmod(blob, 0o644)
    blob.write_bytes(blob.read_bytes().replace(b"llama", b"LLAMA"))
    proc = run_cli("verify", "--upstream", "--all", "--json", check=1)
    statuses = {r["name"]: r["status"] for r in json.loads(proc.stdout)}
    assert statuses["acme/moving"] == "differs" and statuses["acme/tiny"] == "ok"


def test_no_token_over_plain_http_to_another_host(hubp, home, tmp_path):
    token_file = tmp_path / "t"
    token_file.write_text(MIRROR_TOKEN)
    proc = run_cli("pull", "acme/tiny", "--endpoint", "http://mirror.invalid", "--token-file", str(token_file),
                   check=2)
    assert proc.stderr.startswith("error: refusing to send a token over plain http to http://mirror.invalid")
    _write_config(home, f'[[endpoints]]\nurl = "http://mirror.invalid"\ntoken_file = "{token_file}"\n')
    proc = run_cli("pull", "acme/tiny", "--endpoint", "http://mirror.invalid", check=2)
    assert "allow_http_token = true" in proc.stderr and str(home / "config.toml") in proc.stderr
    assert hubp.proxy.requests == []


@pytest.mark.parametrize("text, message", [
    ('[[endpoints]]\nurl = "ftp://x"\n', "endpoints[0].url must be an http:// or https:// URL"),
    ('[[endpoints]]\nurl = "https://x"\ntokenfile = "/t"\n', "unknown key endpoints[0].tokenfile"),
    ('[[endpoints]]\nurl = "https://x"\ntoken_file = "rel/t"\n', "endpoints[0].token_file must be an absolute"),
    ('[[endpoints]]\nurl = "https://x"\ntoken_file = "/t"\ntoken_env = "T"\n', "token_file or token_env, not both"),
    ('[paths]\nallowed_roots = "/data"\n', "paths.allowed_roots must be a list of absolute paths"),
    ('[path]\n', "unknown key path"),
    ('[[endpoints]\n', "is not valid TOML"),
])
def test_bad_configuration_is_one_clear_error(home, tiny_model, text, message):
    # The library call the import job makes (BadInput: exit 2); a configuration error as a command, one line:
    # test_registry_config_names_the_file.
    from registry.errors import BadInput
    from registry.importer import import_folder

    _write_config(home, text)
    with pytest.raises(BadInput) as refused:
        import_folder(Registry(), tiny_model, "tiny")
    err = str(refused.value)
    assert "\n" not in err and err.startswith(f"{home / 'config.toml'}") and message in err, err


def test_registry_config_names_the_file(home, tiny_model, tmp_path):
    missing = tmp_path / "nope.toml"
    proc = run_cli("import", str(tiny_model), "--name", "tiny", env={"REGISTRY_CONFIG": str(missing)}, check=2)
    assert f"REGISTRY_CONFIG names {missing}, which does not exist" in proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
