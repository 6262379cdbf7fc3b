"""Follow (`[[follow]]` in daemon.toml): a followed repo's new commit on the olah mirror is pulled once, by the
same job `registry pull` queues, on SQLite and PostgreSQL; bad config and unreachable hubs are reported."""
from __future__ import annotations

import json
import threading
import time
import uuid

import pytest

from conftest import run_cli
from hubproxy import commit_change, free_port, make_repo

from registry import Registry, jobs
from registry.catalog import resolve
from registry.daemon.follow import follow_services, parse_follows, pull_job
from registry.daemon.options import ConfigErrors
from registry.models import Artifact, Event, Job, Tag, Trigger
from registry.workers import worker_loop


def _trust(home, *urls: str) -> None:
    """Trust endpoints in the host's worker configuration, as an operator does for a followed mirror."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text("".join(f'[[endpoints]]\nurl = "{u}"\n' for u in urls))


def _follows(**table) -> list:
    problems: list[str] = []
    follows = parse_follows([table], problems)
    assert problems == []
    return follows


@pytest.fixture
def followed(hubp, tiny_model_template):
    """A repo of its own on the shared mirror (the hub lives for the session; each test pushes to its own)."""
    repo_id = f"acme/follow-{uuid.uuid4().hex[:8]}"
    return repo_id, make_repo(hubp.mirrors, repo_id, tiny_model_template)


def test_new_commit_is_pulled_once_and_the_old_one_kept(db_url, hubp, followed, home, monkeypatch):
    monkeypatch.delenv("HF_ENDPOINT")  # trusted through config.toml only, as a mirror the daemon follows
    repo_id, repo = followed
    _trust(home, hubp.url)
    reg = Registry()
    reg.init()
    service, = follow_services(reg, _follows(repo=repo_id, every="1s", endpoint=hubp.url + "/", tag="mirror"))

    service.tick()
    first = service.last_commit
    service.tick()  # the same commit: nothing more is queued
    with reg.read_session() as s:
        queued = s.query(Job).filter(Job.type == "pull").all()
        assert [(j.params["commit"], j.params["endpoint"]) for j in queued] == [(first, hubp.url)]
        assert s.query(Event).filter(Event.kind == "follow_queued").count() == 1
    assert worker_loop(reg, once=True) == 1

    second = commit_change(repo, "generation_config.json", json.dumps({"note": "v2"}).encode())
    restarted, = follow_services(reg, _follows(repo=repo_id, every="1s", endpoint=hubp.url, tag="mirror"))
    restarted.tick()
    restarted.tick()
    assert restarted.last_commit == second and restarted.status()["last_error"] is None
    assert worker_loop(reg, once=True) == 1
    service.tick()  # the first instance (another daemon) finds the commit handled
    assert worker_loop(reg, once=True) == 0

    with reg.read_session() as s:
        pulled = s.query(Artifact).order_by(Artifact.id).all()
        assert [(a.name, a.source_revision, a.status) for a in pulled] == [
            (repo_id, first, "ready"), (f"{repo_id}@{second[:12]}", second, "ready")]
        assert resolve(s, f"{repo_id}:main").source_revision == second  # the branch's tag moved to the new one
        assert resolve(s, "mirror").source_revision == second
        subjects = sorted(t.subject for t in s.query(Trigger).filter(Trigger.source == "follow"))
        assert subjects == sorted(f"follow:{hubp.url}:{repo_id}@{c}" for c in (first, second))
        assert all(j.state == "succeeded" for j in s.query(Job))


def test_a_commit_pulled_by_hand_is_not_pulled_again(db_url, hubp, followed, home):
    repo_id, _ = followed
    run_cli("pull", repo_id)
    reg = Registry()
    service, = follow_services(reg, _follows(repo=repo_id, every="1h"))  # HF_ENDPOINT: the daemon's own hub
    service.tick()
    assert service.last_commit and service.status()["queued"] == 0
    with reg.read_session() as s:
        assert s.query(Job).filter(Job.state == "queued").count() == 0


def test_the_pull_job_is_the_one_registry_pull_queues(hubp, followed, home):
    """Same params and dedup key: a follow and a hand-run pull of one commit share one job."""
    repo_id, repo = followed
    run_cli("pull", repo_id, "--endpoint", hubp.url, "--include", "*.json", "--tag", "x", "--detach")
    reg = Registry()
    with reg.read_session() as s:
        job = s.query(Job).one()
    commit = job.params["commit"]
    params, key = pull_job(repo_id, "main", commit, hubp.url, ["*.json"], [], None, None, 8, ["x"])
    assert params == job.params
    with reg.session() as s:
        again, created = jobs.enqueue(s, "pull", params, key)
        assert (again.id, created) == (job.id, False)


def test_unreachable_endpoint_is_last_error_and_the_service_goes_on(home, monkeypatch):
    dead = f"http://127.0.0.1:{free_port()}"
    _trust(home, dead)
    reg = Registry()
    reg.init()
    service, = follow_services(reg, _follows(repo="acme/tiny", every="0.2s", endpoint=dead))
    stopping = threading.Event()
    thread = threading.Thread(target=service.run, args=(stopping,), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while service.ticks < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    status = service.status()
    assert status["ticks"] >= 2 and thread.is_alive()
    assert status["last_error"].startswith(f"OperationFailed: cannot reach the hub for acme/tiny@main")
    assert status["last_tick_at"] is None and status["last_commit"] is None
    stopping.set()
    thread.join(5)
    assert not thread.is_alive()


def test_untrusted_endpoint_is_refused_at_start(home):
    reg = Registry()
    with pytest.raises(ConfigErrors) as err:
        follow_services(reg, _follows(repo="acme/tiny", endpoint="https://mirror.example"))
    assert "follow acme/tiny@main: endpoint https://mirror.example is not trusted" in str(err.value)
    assert f'add [[endpoints]] url = "https://mirror.example"' in str(err.value)
    assert str(home / "config.toml") in str(err.value)


def test_config_problems_are_all_reported():
    problems: list[str] = []
    follows = parse_follows([
        {"repo": "acme/tiny@v1", "revision": "main", "every": "soon", "endpoint": "ftp://x", "kind": "blob",
         "tag": "bad tag", "include": 3, "workers": 0, "colour": "red"},
        {"revision": "main"},
        {"repo": "not a repo"},
        {"repo": "acme/tiny", "revision": "v1", "include": ["*.json"], "every": "15m"},
        {"repo": "acme/tiny@v1", "include": "*.json"},
        {"repo": "acme/other", "endpoint": "https://bot:hunter2@mirror.example"},
    ], problems)
    assert problems == [
        "follow[0].colour: unknown key; known keys: endpoint, every, exclude, include, kind, repo, revision, tag, "
        "workers",
        "follow[0].revision: the repo already names a revision (acme/tiny@v1); give one of the two",
        "follow[0].every: 'soon' is not a duration; write seconds or e.g. \"30s\", \"15m\", \"1h\", \"7d\"",
        "follow[0].endpoint: 'ftp://x' must be an http:// or https:// URL with a host",
        "follow[0].kind: unknown kind 'blob'; use one of: base, adapter, merged, quantized, checkpoint, gguf",
        "follow[0].tag: invalid tag 'bad tag': use letters, digits and . _ - / : @ + without '..' "
        "(e.g. llama-7b or org/model:v1)",
        "follow[0].workers: 0 must be a whole number of at least 1",
        "follow[0].include: 3 must be a list of strings",
        "follow[1].repo: required",
        "follow[2].repo: malformed repo id 'not a repo'; use org/name or org/name@revision",
        "follow[4]: follows acme/tiny@v1 as follow[3] does; remove one",
        "follow[5].endpoint: must not hold a user or password (user:password@); give the endpoint's token with "
        "token_file or token_env in its [[endpoints]] entry of config.toml",
    ]
    assert not any("hunter2" in p for p in problems)
    last = follows[-3]
    assert (last.repo, last.revision, last.every, last.include, last.endpoint) == (
        "acme/tiny", "v1", 900.0, ("*.json",), None)


def test_a_pull_that_failed_on_the_hub_is_queued_again(db_url, hubp, followed, home):
    repo_id, _ = followed
    reg = Registry()
    reg.init()
    service, = follow_services(reg, _follows(repo=repo_id, every="1h"))
    hubp.proxy.status_override[f"/{repo_id}/resolve/"] = (503, {})  # every file download fails
    service.tick()
    assert worker_loop(reg, once=True) == 1
    with reg.read_session() as s:
        failed = s.query(Job).one()
    assert (failed.state, failed.exit_code) == ("failed", 1) and "503" in failed.error
    hubp.proxy.status_override.clear()
    service.tick()
    service.tick()
    assert worker_loop(reg, once=True) == 1
    with reg.read_session() as s:
        assert [(j.state, j.params["commit"]) for j in s.query(Job).order_by(Job.id)] == [
            ("failed", service.last_commit), ("succeeded", service.last_commit)]
        trigger = s.query(Trigger).filter(Trigger.source == "follow").one()
        assert trigger.job_id == s.query(Job).filter(Job.state == "succeeded").one().id
        assert [e.detail["retry"] for e in s.query(Event).filter(Event.kind == "follow_queued")] == [False, True]
        assert resolve(s, f"{repo_id}:main").source_revision == service.last_commit
