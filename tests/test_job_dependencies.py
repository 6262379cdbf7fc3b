"""Jobs that wait for another job (a quantize for its merge), and idle workers woken without polling the queue."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from conftest import REGISTRY_BIN
from registry import Registry, jobs
from registry.workers.wakeup import JobWaiter


@pytest.fixture
def qreg(db_url) -> Registry:
    r = Registry(database_url=db_url)
    r.init()
    return r


def _state(reg, job_id):
    with reg.read_session() as s:
        j = jobs.get(s, job_id)
        return j.state, j.error


def test_a_job_waits_for_the_one_it_runs_after(qreg):
    with qreg.session() as s:
        parent, _ = jobs.enqueue(s, "merge", {"adapter": "a"})
        child, _ = jobs.enqueue(s, "quantize", {"from_after": "source_id", "options": {}}, after=parent.id)
        parent_id, child_id = parent.id, child.id
    with qreg.session() as s:
        first = jobs.claim(s, "w1")
        assert first.id == parent_id
        assert jobs.claim(s, "w2") is None  # the child is queued but not runnable yet
    with qreg.session() as s:
        jobs.complete(s, parent_id, "w1", result_artifact_id=None)
    with qreg.session() as s:
        second = jobs.claim(s, "w2")
        assert second.id == child_id
        with pytest.raises(Exception, match=f"needs the artifact of job {parent_id}, which made none"):
            jobs.params_for_run(s, second)
        assert jobs.job_dict(second)["after"] == parent_id


def test_a_failed_or_cancelled_parent_fails_its_chain_with_the_reason(qreg):
    with qreg.session() as s:
        merge, _ = jobs.enqueue(s, "merge", {"adapter": "a"}, max_attempts=1)
        quantize, _ = jobs.enqueue(s, "quantize", {"options": {}}, after=merge.id)
        verify, _ = jobs.enqueue(s, "verify", {}, after=quantize.id)
        ids = merge.id, quantize.id, verify.id
    with qreg.session() as s:
        jobs.claim(s, "w1")
        jobs.fail(s, ids[0], "w1", "base llama-7b not found", exit_code=3, retry=True)  # no attempts left
    state, error = _state(qreg, ids[1])
    assert state == "failed" and error == f"job {ids[0]} (merge) it waited for failed: base llama-7b not found"
    state, error = _state(qreg, ids[2])
    assert state == "failed" and f"job {ids[1]} (quantize) it waited for failed" in error
    with qreg.session() as s:
        assert jobs.claim(s, "w2") is None

    with qreg.session() as s:
        parent, _ = jobs.enqueue(s, "merge", {"adapter": "b"})
        child, _ = jobs.enqueue(s, "quantize", {"options": {}}, after=parent.id)
        ids = parent.id, child.id
    with qreg.session() as s:
        jobs.cancel(s, ids[0])
    assert _state(qreg, ids[1]) == ("failed", f"job {ids[0]} (merge) it waited for cancelled: cancelled before it ran")
    with qreg.session() as s:  # queued after its parent already failed: fails at once
        late, _ = jobs.enqueue(s, "quantize", {"options": {}}, after=ids[0])
        late_id = late.id
    assert _state(qreg, late_id)[0] == "failed"


def test_the_jobs_of_a_dead_process_are_claimable_at_once(qreg):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # a pid that no longer exists
    owner = f"{jobs.this_host()}:{proc.pid}:abc123"
    with qreg.session() as s:
        job, _ = jobs.enqueue(s, "verify", {})
        jobs.claim(s, owner, lease_seconds=3600, job_id=job.id)
        job_id = job.id
    with qreg.session() as s:
        assert jobs.claim(s, "other") is None
        assert jobs.expire_leases_of_process(s, proc.pid) == [job_id]
    with qreg.session() as s:
        assert jobs.claim(s, "other").id == job_id


def test_an_idle_worker_wakes_when_a_job_is_queued(qreg):
    waiter = JobWaiter(qreg)
    stop = threading.Event()
    try:
        waiter.wait(0.05, stop)  # connects (and LISTENs on PostgreSQL)
        woke = []

        def wait():
            start = time.monotonic()
            waiter.wait(20, stop)
            woke.append(time.monotonic() - start)

        thread = threading.Thread(target=wait)
        thread.start()
        time.sleep(0.3)
        with qreg.session() as s:
            jobs.enqueue(s, "verify", {})
        thread.join(10)
        assert woke and woke[0] < 2.0  # not the 20 s fallback
        start = time.monotonic()
        stop.set()
        waiter.wait(20, stop)
        assert time.monotonic() - start < 1.0  # a stop request ends the wait
    finally:
        waiter.close()


def test_worker_type_option_runs_only_those_jobs(qreg, tmp_path):
    with qreg.session() as s:
        verify, _ = jobs.enqueue(s, "verify", {"all": True, "quick": True})
        merge, _ = jobs.enqueue(s, "merge", {"adapter": "x", "base": "y"})
        ids = verify.id, merge.id
    env = {**os.environ, "REGISTRY_DATABASE_URL": qreg.settings.database_url, "REGISTRY_HOME": str(qreg.home)}
    out = subprocess.run([REGISTRY_BIN, "worker", "--once", "--type", "verify"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert _state(qreg, ids[0])[0] == "succeeded"
    assert _state(qreg, ids[1])[0] == "queued"
    bad = subprocess.run([REGISTRY_BIN, "worker", "--type", "bake"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "bake" in bad.stderr
