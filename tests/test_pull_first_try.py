"""Pull and verify --upstream as a new user meets them (issue 9): filtered pulls and tags, cancelling a stalled
pull, verify --upstream of an --hf-cache import, what a pull says, and blobs imported before a pull."""
from __future__ import annotations

import json
import os
import pty
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REGISTRY_BIN, cli_json, import_here, run_cli
from hubproxy import free_port


def _pull_text(*args: str, **kw) -> str:
    return run_cli("pull", *args, **kw).stdout


def test_filtered_pull_takes_no_name_or_tag_of_the_repo(hubp):
    filtered = _pull_text("acme/tiny", "--exclude", "tokenizer*")
    assert "already in the store" not in filtered  # nothing was: every file was downloaded
    assert f"not tagged (a filtered pull leaves acme/tiny's tags alone; --tag TAG tags it)" in filtered
    whole = cli_json("pull", "acme/tiny")
    # The filtered subset came first, yet the whole commit gets the repo's name and its tag.
    assert whole["name"] == "acme/tiny" and whole["tags"] == ["acme/tiny:main"]
    sub = cli_json("pull", "acme/tiny", "--exclude", "tokenizer*")
    assert sub["name"] == f"acme/tiny@{hubp.second[:12]}-filtered-{sub['digest'][7:15]}"
    assert sub["tag"] is None and sub["tags"] == [] and sub["files"] == whole["files"] - 2
    assert cli_json("show", sub["name"])["provenance"]["pull_filter"] == {"include": [], "exclude": ["tokenizer*"]}
    offline = {"HF_HUB_OFFLINE": "1"}
    assert json.loads(_pull_text("acme/tiny", "--json", env=offline))["digest"] == whole["digest"]
    assert json.loads(_pull_text("acme/tiny", "--exclude", "tokenizer*", "--json", env=offline))["name"] == sub["name"]
    proc = run_cli("pull", "acme/tiny", "--include", "*.json", env=offline, check=3)
    assert "with this --include/--exclude filter is not in the registry" in proc.stderr
    # Asked for, a tag goes on the subset; the repo's own tag stays on the whole commit.
    tagged = cli_json("pull", "acme/tiny", "--exclude", "tokenizer*", "--tag", "acme/tiny:no-tokenizer")
    assert tagged["tags"] == ["acme/tiny:no-tokenizer"] and tagged["name"] == sub["name"]
    assert cli_json("show", "acme/tiny:no-tokenizer")["digest"] == sub["digest"]
    assert cli_json("show", "acme/tiny:main")["digest"] == whole["digest"]
    assert "invalid tag 'bad tag'" in run_cli("pull", "acme/tiny", "--tag", "bad tag", check=2).stderr


def test_pull_after_a_folder_import_downloads_only_what_is_new(hubp, tiny_model_template):
    import_here(tiny_model_template, "local-tiny")
    hubp.proxy.reset()
    text = _pull_text(f"acme/tiny@{hubp.first}")
    # The small files' git blob ids were computed at import, so only the repo's README crosses the wire.
    assert set(hubp.proxy.sent) == {"README.md"}
    assert "downloaded 1 file (" in text and "the other 5 files were already in the store" in text


def _hf_cache_from_repo(cache: Path, repo_id: str, repo: Path, commit: str) -> None:
    """The layout huggingface_hub's cache uses (refs/main, snapshots/<commit>), filled from a repo's work tree."""
    folder = cache / ("models--" + repo_id.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    shutil.copytree(repo, folder / "snapshots" / commit, ignore=shutil.ignore_patterns(".git*"))


def test_verify_upstream_of_an_hf_cache_import(hubp, tmp_path):
    cache = tmp_path / "hf-cache"
    _hf_cache_from_repo(cache, "acme/tiny", hubp.mirrors / "models" / "acme" / "tiny", hubp.second)
    run_cli("import", "--hf-cache", "acme/tiny", "--cache-dir", str(cache))  # HF_ENDPOINT is the test hub
    assert cli_json("show", "acme/tiny")["source"]["endpoint"] == hubp.url
    no_env = {"HF_ENDPOINT": ""}
    out = run_cli("verify", "--upstream", "acme/tiny", env=no_env).stdout  # asks where it came from
    assert f"matches the hub at {hubp.url}" in out and "main still points at" in out
    run_cli("import", "--hf-cache", "acme/tiny", "--cache-dir", str(cache), "--name", "no-endpoint", env=no_env)
    assert cli_json("show", "no-endpoint")["source"]["endpoint"] is None
    nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens: huggingface_hub would retry for ~24 s
    started = time.monotonic()
    proc = run_cli("verify", "--upstream", "no-endpoint", env={"HF_ENDPOINT": nowhere}, check=1)
    assert time.monotonic() - started < 8
    assert f"no-endpoint records no endpoint (an --hf-cache import made without HF_ENDPOINT), so {nowhere} was " \
           "asked: pass --endpoint URL" in proc.stderr
    out = run_cli("verify", "--upstream", "no-endpoint", "--endpoint", hubp.url, env=no_env).stdout
    assert f"matches the hub at {hubp.url}" in out
    hubp.proxy.reset()
    proc = run_cli("verify", "--upstream", "acme/tiny", env={"HF_HUB_OFFLINE": "1"}, check=1)
    assert proc.stderr.startswith("error: HF_HUB_OFFLINE is set: verify --upstream asks the hub")
    assert hubp.proxy.requests == []
    proc = run_cli("verify", "--upstream", "--quick", "acme/tiny", check=2)
    assert proc.stderr.startswith("error: --quick does not go with --upstream") and len(proc.stderr.splitlines()) == 1


def test_cancel_stops_a_stalled_pull_at_once(hubp, home):
    hubp.proxy.faults["model.safetensors"] = "stall"  # 64 KiB, then no byte for a minute
    proc = subprocess.Popen([REGISTRY_BIN, "pull", "acme/big"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.time() + 60
        while hubp.proxy.sent.get("model.safetensors", 0) < 64 * 1024:
            assert time.time() < deadline and proc.poll() is None, "the pull never reached the stall"
            time.sleep(0.05)
        time.sleep(0.5)  # the stall has begun: no progress update will come
        job = cli_json("jobs")[0]
        assert job["state"] == "running"
        started = time.monotonic()
        run_cli("cancel", str(job["id"]))
        _, err = proc.communicate(timeout=30)
        assert time.monotonic() - started < 4  # heartbeat (1 s) + the pull's stop check (0.2 s) + slack
    finally:
        proc.kill()
        hubp.proxy.reset()  # lets the stalled handler go
    assert proc.returncode == 1 and f"job {job['id']} was cancelled" in err
    assert cli_json("job", str(job["id"]))["state"] == "cancelled"
    assert list((home / "tmp").glob("pull-*.part"))  # kept: pulling again resumes it


@pytest.mark.sqlite_only  # what a terminal shows; the catalog plays no part
def test_progress_bar_uses_binary_units(hubp):
    hubp.proxy.faults["model.safetensors"] = "slow"
    master, slave = pty.openpty()  # the bar is drawn only on a terminal
    proc = subprocess.Popen([REGISTRY_BIN, "pull", "acme/big"], stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    shown = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(master)
    summary = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 0
    bar = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown.decode(errors="replace"))
    assert "3.0/3.0 MiB" in bar and "MiB/s" in bar
    assert not re.search(r"\d (kB|MB|GB)\b", bar + summary)


@pytest.mark.sqlite_only  # the worker's logging set-up; the catalog plays no part
def test_worker_does_not_log_every_http_request(hubp):
    run_cli("pull", "acme/tiny", "--detach")
    log = run_cli("worker", "--once").stderr
    assert "registry.worker job 1 succeeded" in log
    assert "HTTP Request" not in log and "httpx" not in log


def test_a_commit_with_no_files_is_refused(hubp):
    from hubproxy import git

    repo = hubp.mirrors / "models" / "acme" / "empty"
    if not repo.exists():
        repo.mkdir(parents=True)
        git(repo, "init", "-q", "-b", "main")
        git(repo, "commit", "-q", "--allow-empty", "-m", "nothing yet")
    proc = run_cli("pull", "acme/empty", check=2)
    assert proc.stderr.startswith("error: acme/empty@") and proc.stderr.strip().endswith("has no files")
    assert cli_json("list") == []  # no empty artifact, no tag
