"""The job queue on SQLite and PostgreSQL: dedup, leases, retries, cancel, concurrency, crashed workers."""
from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest

from conftest import REGISTRY_BIN, cli_json, run_cli
from registry import Registry, jobs
from registry.models import utcnow


@pytest.fixture
def qreg(db_url) -> Registry:
    r = Registry(database_url=db_url)
    r.init()
    return r


def test_enqueue_dedups_unfinished_jobs(qreg):
    with qreg.session() as s:
        a, created_a = jobs.enqueue(s, "verify", {"refs": ["x"]}, "verify:x")
        b, created_b = jobs.enqueue(s, "verify", {"refs": ["x"]}, "verify:x")
        other, _ = jobs.enqueue(s, "verify", {"refs": ["y"]}, "verify:y")
    assert created_a and not created_b and a.id == b.id and other.id != a.id
    with qreg.session() as s:
        claimed = jobs.claim(s, "w1", job_id=a.id)
        jobs.complete(s, claimed.id, "w1", {"ok": True})
    with qreg.session() as s:
        again, created = jobs.enqueue(s, "verify", {"refs": ["x"]}, "verify:x")
    assert created and again.id != a.id  # a finished job no longer absorbs new requests


def test_claim_lease_heartbeat_and_complete(qreg):
    with qreg.session() as s:
        job, _ = jobs.enqueue(s, "verify", {}, None)
    with qreg.session() as s:
        claimed = jobs.claim(s, "w1", lease_seconds=30)
        assert claimed.id == job.id and claimed.state == "running" and claimed.attempts == 1
        assert jobs.claim(s, "w2") is None  # leased jobs are not handed out twice
    with qreg.session() as s:
        jobs.heartbeat(s, job.id, "w1", 30, done=5, total=10, unit="B")
    with qreg.session() as s:
        with pytest.raises(Exception, match="no longer leased"):
            jobs.heartbeat(s, job.id, "intruder", 30)
    with qreg.session() as s:
        done = jobs.complete(s, job.id, "w1", {"answer": 42})
    assert done.state == "succeeded" and done.result == {"answer": 42} and done.progress_done == 10


def test_fail_retries_with_backoff_then_gives_up(qreg):
    with qreg.session() as s:
        job, _ = jobs.enqueue(s, "verify", {}, None, max_attempts=2)
    with qreg.session() as s:
        jobs.claim(s, "w1")
        failed = jobs.fail(s, job.id, "w1", "boom")
        assert failed.state == "queued" and failed.run_after > utcnow()
        assert jobs.claim(s, "w1") is None  # still backing off
        failed.run_after = utcnow() - timedelta(seconds=1)
    with qreg.session() as s:
        assert jobs.claim(s, "w1").attempts == 2
        final = jobs.fail(s, job.id, "w1", "boom again")
    assert final.state == "failed" and final.error == "boom again" and final.finished_at is not None


def test_expired_lease_is_reclaimed_until_attempts_run_out(qreg):
    with qreg.session() as s:
        job, _ = jobs.enqueue(s, "verify", {}, None, max_attempts=2)
    for attempt, owner in ((1, "w1"), (2, "w2")):
        with qreg.session() as s:
            claimed = jobs.claim(s, owner, lease_seconds=0.05)
            assert claimed.id == job.id and claimed.attempts == attempt
        time.sleep(0.1)
    with qreg.session() as s:
        assert jobs.claim(s, "w3") is None
        assert jobs.get(s, job.id).state == "failed"
        assert "stopped responding" in jobs.get(s, job.id).error


def test_cancel_queued_and_running(qreg):
    with qreg.session() as s:
        queued, _ = jobs.enqueue(s, "verify", {}, "a")
        running, _ = jobs.enqueue(s, "verify", {}, "b")
    with qreg.session() as s:
        jobs.claim(s, "w1", job_id=running.id)
        assert jobs.cancel(s, queued.id).state == "cancelled"
        assert jobs.cancel(s, running.id).cancel_requested
    with qreg.session() as s:
        with pytest.raises(Exception, match="cancelled"):
            jobs.heartbeat(s, running.id, "w1")


def test_four_workers_claim_1000_jobs_never_twice(qreg, db_url, tmp_path):
    with qreg.session() as s:
        for i in range(1000):
            jobs.enqueue(s, "verify", {"n": i}, f"job-{i}")
    go = tmp_path / "go"
    outs = [tmp_path / f"worker-{i}.txt" for i in range(4)]
    procs = [subprocess.Popen([sys.executable, str(Path(__file__).parent / "claim_worker.py"), db_url,
                               f"w{i}", str(out), str(go)]) for i, out in enumerate(outs)]
    deadline = time.time() + 60
    while not all(Path(str(o) + ".ready").exists() for o in outs) and time.time() < deadline:
        time.sleep(0.05)
    go.touch()
    for p in procs:
        assert p.wait(timeout=300) == 0
    runs = [int(x) for out in outs for x in out.read_text().split()]
    assert len(runs) == 1000 and len(set(runs)) == 1000
    assert sum(1 for out in outs if out.read_text().strip()) >= 2  # the work really was shared
    with qreg.session() as s:
        states = {j.state for j in jobs.list_jobs(s, limit=2000)}
        assert states == {"succeeded"} and all(j.attempts == 1 for j in jobs.list_jobs(s, limit=2000))


def _sparse_model(folder: Path, size: int) -> Path:
    """A valid safetensors file of `size` data bytes that takes no disk space (a sparse file)."""
    folder.mkdir()
    header = json.dumps({"w": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}}).encode()
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + size)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    return folder


def test_killed_worker_job_is_picked_up_after_lease_expires(qreg, hubp):
    # A pull stalled on the hub (64 KiB of the weights, then nothing until released) keeps the job running, at
    # no CPU cost, until the worker is killed. (It was a verify of 3 GiB of sparse zeros, hashed twice.)
    hubp.proxy.faults["model.safetensors"] = "stall"
    job = cli_json("pull", "acme/big", "--detach")["job"]
    worker = subprocess.Popen([REGISTRY_BIN, "worker", "--lease", "2"], stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while hubp.proxy.sent.get("model.safetensors", 0) < 64 * 1024:  # claimed, downloading, now stalled
            assert time.time() < deadline and worker.poll() is None
            time.sleep(0.02)
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    stuck = cli_json("job", str(job))
    assert stuck["state"] == "running" and stuck["attempts"] == 1
    time.sleep(2.5)  # let the dead worker's lease run out
    hubp.proxy.unstall.set()
    run_cli("worker", "--once", "--lease", "10")
    done = cli_json("job", str(job))
    assert done["state"] == "succeeded" and done["attempts"] == 2 and done["result_artifact_id"] is not None


def test_detached_import_runs_in_worker(db_url, tiny_model):
    queued = cli_json("import", str(tiny_model), "--name", "tiny", "--detach")
    assert cli_json("job", str(queued["job"]))["state"] == "queued"
    assert cli_json("list") == []
    assert "queued job" in run_cli("import", str(tiny_model), "--name", "tiny", "--detach").stdout
    assert [j["id"] for j in cli_json("jobs", "--state", "queued")] == [queued["job"]]  # deduplicated
    run_cli("worker", "--once")
    job = cli_json("job", str(queued["job"]))
    assert job["state"] == "succeeded" and job["result_artifact_id"] is not None
    assert [a["name"] for a in cli_json("list")] == ["tiny"]
    assert "succeeded" in run_cli("jobs").stdout


def test_cancel_command(home, tiny_model):
    queued = cli_json("import", str(tiny_model), "--name", "tiny", "--detach")
    assert "cancelled" in run_cli("cancel", str(queued["job"])).stdout
    run_cli("worker", "--once")
    assert cli_json("list") == []


def test_two_processes_import_same_folder_at_once(home, reg, tiny_model):
    from conftest import blob_files

    cmds = [[REGISTRY_BIN, "import", str(tiny_model), "--name", "tiny"]] * 2 + \
           [[REGISTRY_BIN, "import", str(tiny_model), "--name", n] for n in ("copy-a", "copy-b")]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert sorted(a["name"] for a in cli_json("list")) == ["copy-a", "copy-b", "tiny"]
    assert len(blob_files(home)) == 5
    assert list((home / "tmp").iterdir()) == []
    run_cli("verify", "--all")
