"""`registry pull REPO --endpoint <another registry>` (issue 11 item 5): a registry served by `registry serve` is an
HF-compatible endpoint, so the pull that copies a model from the hub copies an artifact from one registry into
another, with the same verification and the same digest; a tag of the source is a revision; a refused token
says so.

Registry 1 is served in a thread of the test process; registry 2 is the real `registry pull` process with its
own home (and, on PostgreSQL, its own database).
"""
from __future__ import annotations

import json

import pytest

from conftest import _create_pg_database, _drop_pg_database, _pg_url, import_here, run_cli, tag_here
from conftest import write_safetensors_header
from serving import make_token, serve_in_thread

pytestmark = pytest.mark.parametrize("home", ["sqlite", "postgresql"], indirect=True)


def _model(folder, size: int):
    """A small model folder (no torch needed); `size` makes its weights distinct."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "size": size}))
    (folder / "sub").mkdir()
    (folder / "sub" / "notes.txt").write_text("a file in a folder\n")
    write_safetensors_header(folder / "model.safetensors", {"w": {"dtype": "F32", "shape": [size],
                                                                  "data_offsets": [0, 4 * size]}}, 4 * size)
    return folder


@pytest.fixture
def source(home, tmp_path):
    """Registry 1, served: acme/tiny (the newest), and acme/tiny-old tagged acme/tiny:v1; a read token in a file."""
    from registry import Registry

    reg = Registry()
    reg.init()
    old = import_here(_model(tmp_path / "old", 16), "acme/tiny-old")
    new = import_here(_model(tmp_path / "new", 64), "acme/tiny")
    tag_here("acme/tiny-old", "acme/tiny:v1")
    token_file = tmp_path / "token"
    token_file.write_text(make_token(reg, "read") + "\n")
    with serve_in_thread(reg) as url:
        yield {"url": url, "token_file": str(token_file), "digest": new["digest"], "old": old["digest"]}


@pytest.fixture
def other(request, home, tmp_path):
    """Registry 2's environment: another home, and another database on the same backend."""
    env = {"REGISTRY_HOME": str(tmp_path / "home2"), "HF_HOME": str(tmp_path / "hf-home"), "HF_TOKEN": "",
           "HF_ENDPOINT": "", "REGISTRY_URL": ""}
    pg = _create_pg_database() if request.node.callspec.params["home"] == "postgresql" else None
    env["REGISTRY_DATABASE_URL"] = _pg_url(pg) if pg else ""
    yield env
    if pg:
        _drop_pg_database(pg)


def test_pull_copies_an_artifact_between_registries_with_its_digest(source, other):
    url, token = source["url"], source["token_file"]
    out = run_cli("pull", "acme/tiny", "--endpoint", url, "--token-file", token, env=other).stdout
    commit = source["digest"][7:47]  # a served artifact's commit id is derived from its digest
    assert out.startswith(f"pulled acme/tiny@{commit[:12]} as acme/tiny (base) {source['digest']}: 4 files")
    assert "tagged acme/tiny:main" in out
    shown = _show(other, "acme/tiny")  # what `registry show --json` prints there
    assert shown["digest"] == source["digest"] and shown["status"] == "ready"
    assert shown["source"] == {"repo": "acme/tiny", "revision": commit, "path": None, "endpoint": url,
                               "ref": "main"}
    assert sorted(f["path"] for f in shown["file_list"]) == ["config.json", "model.safetensors", "sub/notes.txt",
                                                            "tokenizer.json"]
    # A tag of registry 1 is a revision: acme/tiny:v1 there is acme/tiny@v1 here, the same content.
    data = json.loads(run_cli("pull", "acme/tiny@v1", "--endpoint", url, "--token-file", token, "--json",
                              env=other).stdout)
    assert data["digest"] == source["old"] and data["tags"] == ["acme/tiny:v1"]
    assert _show(other, "acme/tiny:v1")["digest"] == source["old"]


def _show(env: dict, ref: str) -> dict:
    """`registry show REF --json` on registry 2, read in this process (a CLI process costs a second)."""
    from registry import Registry
    from registry.catalog import details, resolve

    with Registry(env["REGISTRY_HOME"], env["REGISTRY_DATABASE_URL"] or None).read_session() as s:
        return details(s, resolve(s, ref))


def test_pull_with_a_refused_or_missing_token_says_which(source, other, tmp_path):
    url = source["url"]
    bad = tmp_path / "bad-token"
    bad.write_text("rgt_not-a-token")
    proc = run_cli("pull", "acme/tiny", "--endpoint", url, "--token-file", str(bad), env=other, check=1)
    assert proc.stderr == f"error: {url} answered 401 for acme/tiny@main: it does not accept the token (unknown, " \
                          "expired or revoked) (it says: unknown or revoked token; create one with `registry token " \
                          "create NAME --role read`)\n"
    assert "rgt_not-a-token" not in proc.stdout + proc.stderr
    proc = run_cli("pull", "acme/tiny", "--endpoint", url, env=other, check=1)
    assert proc.stderr.startswith(f"error: {url} answered 401 for acme/tiny@main: a token is needed (set HF_TOKEN")


def test_pull_through_a_catalog_server_from_another_registry(source, other, tmp_path, monkeypatch):
    """REGISTRY_URL=registry 2: its worker pulls from registry 1 (its HF_ENDPOINT, with HF_TOKEN), and the
    command on the laptop waits and prints the summary it prints locally; an endpoint registry 2 does not
    trust is refused at submission with the server's reason (exit 2)."""
    from registry import Registry
    from test_remote_cli import worker_thread

    url = source["url"]
    monkeypatch.setenv("HF_ENDPOINT", url)  # registry 2's workers trust their own HF_ENDPOINT, with HF_TOKEN
    monkeypatch.setenv("HF_TOKEN", open(source["token_file"]).read().strip())
    reg2 = Registry(other["REGISTRY_HOME"], other["REGISTRY_DATABASE_URL"] or None)
    with serve_in_thread(reg2) as url2, worker_thread(reg2):
        laptop = {"REGISTRY_URL": url2, "REGISTRY_TOKEN": make_token(reg2, "write"), "REGISTRY_HOME":
                  str(tmp_path / "laptop"), "REGISTRY_DATABASE_URL": "", "HF_ENDPOINT": "", "HF_TOKEN": ""}
        out = run_cli("pull", "acme/tiny", "--tag", "acme/tiny:copied", env=laptop).stdout
        assert out.startswith(f"pulled acme/tiny@{source['digest'][7:19]} as acme/tiny (base) {source['digest']}")
        assert out.rstrip().endswith("; downloaded 4 files (439 B); tagged acme/tiny:main, acme/tiny:copied")
        proc = run_cli("pull", "acme/tiny", "--endpoint", "http://127.0.0.1:9", env=laptop, check=2)
        assert proc.stderr.strip() == ("error: endpoint http://127.0.0.1:9 is not trusted by this server (its workers' "
                                       "config.toml has no [[endpoints]] entry for it); ask the server's admin")
    assert not (tmp_path / "laptop").exists()
