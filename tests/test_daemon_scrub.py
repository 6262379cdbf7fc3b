"""The daemon's schedules (issue 10, item 5): scrub within a bandwidth budget, repair of what it finds, gc
and prune jobs, and schedules that queue each job once per interval however many daemons share a catalog.
Every test runs on SQLite and PostgreSQL (the `db_url` fixture); workers run in-process (worker_loop)."""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from registry import Registry, jobs
from registry.catalog import remove_artifact
from registry.daemon.schedules import (DEFAULT_BANDWIDTH, ScheduleConfig, ScheduleService, parse_schedules,
                                       schedule_services)
from registry.errors import JobCancelled
from registry.importer import import_folder
from registry.models import Artifact, Blob, Event, Job, Trigger, utcnow
from registry.progress import NullReporter
from registry.schema import JOB_TYPES
from registry.scrub import TokenBucket, scrub
from registry.workers.runner import HANDLERS, worker_loop


@pytest.fixture
def sreg(db_url) -> Registry:
    r = Registry(database_url=db_url)
    r.init()
    return r


def _folder(path: Path, big: int = 64) -> Path:
    """A tiny model folder: three small JSON files and a safetensors file of about `big` random bytes."""
    import numpy as np
    from safetensors.numpy import save_file

    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / "tokenizer.json").write_text('{"version": "1.0"}')
    (path / "generation_config.json").write_text('{"max_length": 16}')
    weights = np.frombuffer(np.random.default_rng(len(str(path))).bytes(big // 4 * 4), dtype=np.float32)
    save_file({"w": weights}, str(path / "model.safetensors"))
    return path


def _blob_of(reg: Registry, name: str, rel: str) -> tuple[str, Path]:
    with reg.read_session() as s:
        artifact = s.scalars(select(Artifact).where(Artifact.name == name, Artifact.status != "deleted")).one()
        sha = next(f.sha256 for f in artifact.files if f.path == rel)
    return sha, reg.store.path(sha)


def _flip_byte(blob: Path, offset: int = 3) -> None:
    os.chmod(blob, 0o644)
    with open(blob, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def _status(reg: Registry, name: str) -> str:
    with reg.read_session() as s:
        return s.scalars(select(Artifact.status).where(Artifact.name == name, Artifact.status != "deleted")).one()


def _queue(reg: Registry, job_type: str, params: dict) -> int:
    with reg.session() as s:
        job, _ = jobs.enqueue(s, job_type, params)
        return job.id


def _job(reg: Registry, job_id: int) -> Job:
    with reg.read_session() as s:
        return jobs.get(s, job_id)


def _jobs_of(reg: Registry, job_type: str) -> list[Job]:
    with reg.read_session() as s:
        return list(s.scalars(select(Job).where(Job.type == job_type).order_by(Job.id)))


def test_every_job_type_has_a_handler():
    assert set(HANDLERS) == set(JOB_TYPES)


# --- scrub ---

def test_scrub_job_rehashes_every_blob_and_stamps_it(sreg, tmp_path):
    import_folder(sreg, _folder(tmp_path / "m"), "m")
    with sreg.read_session() as s:
        before = {b.sha256: b for b in s.scalars(select(Blob))}
    job_id = _queue(sreg, "scrub", {"bandwidth": 50e6})
    worker_loop(sreg, once=True)
    job = _job(sreg, job_id)
    total = sum(b.size for b in before.values())
    assert job.state == "succeeded", job.error
    assert (job.progress_done, job.progress_total, job.progress_unit) == (total, total, "B")
    assert job.result["blobs_checked"] == len(before) and job.result["bytes_read"] == total
    assert job.result["corrupt"] == [] and "all intact" in job.message
    with sreg.read_session() as s:
        after = {b.sha256: b for b in s.scalars(select(Blob))}
    for sha, blob in after.items():
        assert blob.verified_at is not None and blob.verified_at > (before[sha].verified_at or blob.verified_at
                                                                    - timedelta(1))
        assert blob.stat_size == blob.size and blob.stat_inode == os.stat(sreg.store.path(sha)).st_ino
    assert _status(sreg, "m") == "ready"


def test_scrub_starts_with_the_blobs_verified_longest_ago_and_keeps_what_it_checked_when_stopped(sreg, tmp_path):
    import_folder(sreg, _folder(tmp_path / "m"), "m")
    with sreg.session() as s:
        shas = sorted(s.scalars(select(Blob.sha256)))
        s.execute(update(Blob).values(verified_at=utcnow() - timedelta(hours=1)))
        # Oldest first, never-verified before all: shas[2] (NULL), then shas[0] (a year ago), then shas[1].
        s.execute(update(Blob).where(Blob.sha256 == shas[0]).values(verified_at=utcnow() - timedelta(days=365)))
        s.execute(update(Blob).where(Blob.sha256 == shas[1]).values(verified_at=utcnow() - timedelta(days=1)))
        s.execute(update(Blob).where(Blob.sha256 == shas[2]).values(verified_at=None))
        sizes = dict(s.execute(select(Blob.sha256, Blob.size)).all())

    class StopAfter(NullReporter):
        """Cancels the scrub once it reads past the first `limit` bytes (as `registry cancel` would)."""

        def __init__(self, limit):
            super().__init__()
            self.limit = limit

        def advance(self, amount):
            if self.done + amount > self.limit:
                raise JobCancelled("cancelled")
            super().advance(amount)

    started = utcnow() - timedelta(seconds=1)
    with pytest.raises(JobCancelled):
        scrub(sreg, None, StopAfter(sizes[shas[2]]))
    with sreg.read_session() as s:
        fresh = set(s.scalars(select(Blob.sha256).where(Blob.verified_at >= started)))
    assert fresh == {shas[2]}  # the never-verified one, stamped although the scrub was stopped
    with pytest.raises(JobCancelled):
        scrub(sreg, None, StopAfter(sizes[shas[0]]))
    with sreg.read_session() as s:
        fresh = set(s.scalars(select(Blob.sha256).where(Blob.verified_at >= started)))
    assert fresh == {shas[2], shas[0]}  # then the one verified a year ago, not the one verified yesterday


def test_scrub_keeps_to_its_bandwidth_and_reports_progress_while_it_runs(sreg, tmp_path):
    import_folder(sreg, _folder(tmp_path / "m", big=3 * 2**20), "m")
    with sreg.read_session() as s:
        total = sum(s.scalars(select(Blob.size)))
    budget = 1.5e6  # bytes/s: at least total / budget = about 2.1 s
    job_id = _queue(sreg, "scrub", {"bandwidth": budget})
    seen: list[tuple[int, int | None]] = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            job = _job(sreg, job_id)
            if job.state == "running":
                seen.append((job.progress_done, job.progress_total))
            stop.wait(0.1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    started = time.monotonic()
    try:
        worker_loop(sreg, once=True)
    finally:
        stop.set()
        watcher.join()
    elapsed = time.monotonic() - started
    assert total / budget <= elapsed < total / budget + 4, elapsed
    assert _job(sreg, job_id).state == "succeeded"
    assert any(0 < done < total and t == total for done, t in seen), seen  # progress while it ran


def test_token_bucket_holds_the_rate_on_average():
    clock = [0.0]
    bucket = TokenBucket(100.0, burst=50, sleep=lambda s: clock.__setitem__(0, clock[0] + s),
                         clock=lambda: clock[0])
    for _ in range(100):
        bucket.take(10)
    assert clock[0] == pytest.approx(10.0)  # 1,000 bytes at 100 bytes/s
    clock[0] += 60  # idle for a minute: at most `burst` bytes of credit
    t0 = clock[0]
    for _ in range(100):
        bucket.take(10)
    assert clock[0] - t0 == pytest.approx(9.5)


def test_a_damaged_blob_marks_its_artifacts_corrupt_and_repair_jobs_restore_them(sreg, tmp_path):
    folder = _folder(tmp_path / "m")
    import_folder(sreg, folder, "a")
    import_folder(sreg, folder, "b")  # the same files: both hold every blob
    import_folder(sreg, _folder(tmp_path / "other"), "c")  # another folder with the same bytes
    bad_sha, bad_blob = _blob_of(sreg, "a", "config.json")
    good = bad_blob.read_bytes()
    _flip_byte(bad_blob)
    gone_sha, gone_blob = _blob_of(sreg, "a", "tokenizer.json")
    gone_blob.unlink()

    scrub_id = _queue(sreg, "scrub", {"bandwidth": DEFAULT_BANDWIDTH})
    worker_loop(sreg, once=True, types=["scrub"])  # only the scrub: look before the repairs run
    job = _job(sreg, scrub_id)
    assert job.state == "succeeded" and "2 damaged blob(s), 3 repair job(s) queued" in job.message
    found = {c["sha256"]: c for c in job.result["corrupt"]}
    assert found[bad_sha]["status"] == "mismatch" and found[gone_sha]["status"] == "missing"
    assert found[bad_sha]["artifacts"] == ["a", "b", "c"]
    assert {_status(sreg, n) for n in "abc"} == {"corrupt"}
    with sreg.read_session() as s:
        events = list(s.scalars(select(Event).where(Event.kind == "scrub_corrupt").order_by(Event.id)))
        names = {a.id: a.name for a in s.scalars(select(Artifact))}
    assert sorted((names[e.artifact_id], e.detail["status"]) for e in events) == sorted(
        (n, st) for n in "abc" for st in ("mismatch", "missing"))
    assert all(e.job_id == scrub_id for e in events)
    assert {tuple(e.detail["paths"]) for e in events} == {("config.json",), ("tokenizer.json",)}
    repairs = _jobs_of(sreg, "repair")
    assert sorted(j.params["name"] for j in repairs) == ["a", "b", "c"]  # one per artifact, not per blob

    # Scrubbing again before the repairs ran queues no second repair (the dedup key is `repair repair`'s).
    _queue(sreg, "scrub", {})
    worker_loop(sreg, once=True, types=["scrub"])
    assert len(_jobs_of(sreg, "repair")) == 3

    worker_loop(sreg, once=True)  # the repairs: from each artifact's source folder, checked first
    assert {j.state for j in _jobs_of(sreg, "repair")} == {"succeeded"}
    assert {_status(sreg, n) for n in "abc"} == {"ready"}
    assert bad_blob.read_bytes() == good and gone_blob.is_file()
    assert hashlib.sha256(gone_blob.read_bytes()).hexdigest() == gone_sha

    last = _queue(sreg, "scrub", {})
    worker_loop(sreg, once=True)
    assert _job(sreg, last).result["corrupt"] == []


def test_a_repair_that_cannot_restore_leaves_the_artifact_corrupt_with_the_reason(sreg, tmp_path):
    folder = _folder(tmp_path / "m")
    import_folder(sreg, folder, "a")
    sha, blob = _blob_of(sreg, "a", "config.json")
    _flip_byte(blob)
    (folder / "config.json").write_text('{"model_type": "changed"}')  # the source moved on
    _queue(sreg, "scrub", {})
    worker_loop(sreg, once=True)
    repair = _jobs_of(sreg, "repair")[0]
    assert repair.state == "failed" and "a: cannot restore config.json" in repair.error
    assert "has changed since it was imported" in repair.result["unrestorable"][0]["reason"]
    assert _status(sreg, "a") == "corrupt"


# --- gc and prune jobs ---

def test_gc_job_frees_the_blobs_of_a_removed_artifact(sreg, tmp_path):
    import_folder(sreg, _folder(tmp_path / "m"), "m")
    with sreg.session() as s:
        paths = [sreg.store.path(sha) for sha in s.scalars(select(Blob.sha256))]
        remove_artifact(s, "m")
    job_id = _queue(sreg, "gc", {})
    worker_loop(sreg, once=True)
    job = _job(sreg, job_id)
    assert job.state == "succeeded" and job.result["blobs_count"] == 4 and job.message.startswith("freed ")
    assert not any(p.exists() for p in paths)


def test_prune_deletes_old_finished_jobs_and_events_but_nothing_still_referenced(sreg):
    old = utcnow() - timedelta(days=40)
    with sreg.session() as s:
        def job(state, finished=True, **kw):
            j = Job(type="verify", params={}, state=state, created_at=old, run_after=old,
                    finished_at=old if finished else None, **kw)
            s.add(j)
            s.flush()
            return j
        gone = job("succeeded")
        gone_failed = job("failed")
        waited_for = job("succeeded")
        waiting = job("queued", finished=False, after_job_id=waited_for.id)  # old but unfinished
        triggered = job("succeeded")
        last_scrub = Job(type="scrub", params={}, state="succeeded", created_at=old, run_after=old, finished_at=old)
        s.add(last_scrub)  # the last of its type: the scrub schedule counts from it
        s.add(Trigger(source="drop", key="k" * 64, subject="/drop/m", job_id=triggered.id, detail={}))
        recent = Job(type="verify", params={}, state="succeeded", finished_at=utcnow())
        s.add(recent)
        s.flush()
        s.add_all([Event(kind="imported", at=old, job_id=gone.id, detail={}),
                   Event(kind="verified_ok", at=utcnow(), job_id=gone.id, detail={}),
                   Event(kind="gc", at=utcnow(), detail={})])
        ids = {n: j.id for n, j in [("gone", gone), ("gone_failed", gone_failed), ("waited_for", waited_for),
                                    ("waiting", waiting), ("triggered", triggered), ("recent", recent),
                                    ("last_scrub", last_scrub)]}
    prune_id = _queue(sreg, "prune", {"older_than": 30 * 86400})
    worker_loop(sreg, once=True, types=["prune"])
    job = _job(sreg, prune_id)
    assert job.state == "succeeded", job.error
    assert (job.result["jobs_deleted"], job.result["events_deleted"], job.result["jobs_kept_referenced"]) == (2, 1, 3)
    with sreg.read_session() as s:
        left = set(s.scalars(select(Job.id)))
        events = list(s.scalars(select(Event).order_by(Event.id)))
        trigger_job = s.scalars(select(Trigger.job_id)).one()
    assert left == {ids["waited_for"], ids["waiting"], ids["triggered"], ids["recent"], ids["last_scrub"], prune_id}
    assert [(e.kind, e.job_id) for e in events] == [("verified_ok", None), ("gc", None)]
    assert trigger_job == ids["triggered"]


def test_prune_job_with_bad_params_fails_with_the_reason(sreg):
    job_id = _queue(sreg, "prune", {"older_than": "soon"})
    worker_loop(sreg, once=True)
    job = _job(sreg, job_id)
    assert job.state == "failed" and job.attempts == 1 and "older_than='soon'" in job.error
    # Beyond any date the database holds: bad input (exit 2, not retried), not an unexpected OverflowError.
    job_id = _queue(sreg, "prune", {"older_than": 1e12})
    worker_loop(sreg, once=True)
    job = _job(sreg, job_id)
    assert (job.state, job.attempts, job.exit_code) == ("failed", 1, 2)
    assert job.error.startswith("older_than=1000000000000.0: give a positive number of seconds")


@pytest.mark.parametrize("params, error", [
    ({"older_than": float("nan")}, "older_than=nan: give a positive number of seconds"),
    ({"bandwidth": float("inf")}, "scrub bandwidth inf must be a positive number of bytes per second"),
    ({"bandwidth": float("nan")}, "scrub bandwidth nan must be a positive number of bytes per second"),
])
def test_non_finite_job_params_are_bad_input(tmp_path, params, error):
    """NaN and infinity pass `<= 0` checks; SQLite stores them in JSON params (PostgreSQL refuses them)."""
    reg = Registry(database_url=f"sqlite:///{tmp_path / 'registry.db'}", home=tmp_path / "home")
    reg.init()
    job_id = _queue(reg, "prune" if "older_than" in params else "scrub", params)
    worker_loop(reg, once=True)
    job = _job(reg, job_id)
    assert (job.state, job.attempts, job.exit_code) == ("failed", 1, 2) and job.error.startswith(error)


# --- the schedules ---

def test_schedule_config_defaults_and_one_problem_per_bad_key():
    default = parse_schedules({}, problems := [])
    assert problems == [] and [s.job_type for s in default.schedules()] == ["scrub", "prune"]
    assert default.scrub.every == 86400 and default.scrub.params == {"bandwidth": 200e6}
    assert default.prune.params == {"older_than": 30 * 86400} and default.gc is None
    config = parse_schedules({"scrub": {"every": "6h", "bandwidth": "50MiB/s"}, "gc": {},
                              "prune": {"enabled": False}}, problems)
    assert problems == [] and [s.job_type for s in config.schedules()] == ["scrub", "gc"]
    assert config.scrub.every == 6 * 3600 and config.scrub.params["bandwidth"] == 50 * 2**20
    assert config.gc.every == 86400
    parse_schedules({"scrub": {"bandwidth": "fast", "evry": "1h"}, "gc": {"every": "-1h"},
                     "prune": {"older_than": 0, "enabled": "no"}}, problems)
    assert sorted(p.split(":")[0] for p in problems) == ["gc.every", "prune.enabled", "prune.older_than",
                                                          "scrub.bandwidth", "scrub.evry"]
    assert any("scrub.evry: unknown key; known keys: bandwidth, enabled, every" == p for p in problems)


def test_a_schedule_queues_one_job_per_interval_across_daemons(sreg, db_url):
    config = parse_schedules({"scrub": {"every": "1s", "bandwidth": "100MB/s"}}, [])
    mine = ScheduleService(sreg, config.scrub)
    theirs = ScheduleService(Registry(database_url=db_url), config.scrub)  # another daemon, same catalog
    mine.tick()
    theirs.tick()
    queued = _jobs_of(sreg, "scrub")
    assert len(queued) == 1 and queued[0].params == {"bandwidth": 100e6, "by": "schedule"}
    assert mine.status()["current_job"]["job_id"] == queued[0].id and mine.status()["next_due_at"] is None
    assert mine.status()["summary"] == f"scrub every 1s at 100MB/s; never run; now: job {queued[0].id} queued"
    worker_loop(sreg, once=True)
    mine.tick()  # it just finished: not due for `every`
    status = mine.status()
    assert len(_jobs_of(sreg, "scrub")) == 1
    assert status["last_run"]["job_id"] == queued[0].id and status["last_run"]["state"] == "succeeded"
    assert status["next_due_at"] is not None and 0 < mine.interval <= 1.0
    assert status["summary"].startswith(f"scrub every 1s at 100MB/s; last: job {queued[0].id} succeeded at ")
    assert f"; next due {status['next_due_at']}" in status["summary"]
    time.sleep(mine.interval + 0.05)
    theirs.tick()
    mine.tick()
    assert len(_jobs_of(sreg, "scrub")) == 2


def test_daemons_ticking_at_once_queue_one_job(sreg, db_url):
    config = parse_schedules({"prune": {"every": "1h"}}, [])
    services = [ScheduleService(Registry(database_url=db_url), config.prune) for _ in range(4)]
    errors = []

    def tick_many(service):
        try:
            for _ in range(5):
                service.tick()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=tick_many, args=(s,)) for s in services]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(_jobs_of(sreg, "prune")) == 1


def test_gc_is_scheduled_only_when_configured_and_runs_through_a_worker(sreg, tmp_path):
    assert [s.name for s in schedule_services(sreg, ScheduleConfig())] == ["schedule:scrub", "schedule:prune"]
    config = parse_schedules({"gc": {"every": "1h"}, "scrub": {"enabled": False}, "prune": {"enabled": False}}, [])
    [service] = schedule_services(sreg, config)
    service.tick()
    worker_loop(sreg, once=True)
    [gc_job] = _jobs_of(sreg, "gc")
    assert gc_job.state == "succeeded" and gc_job.params == {"by": "schedule"}
    service.tick()
    status = service.status()
    assert status["last_run"]["state"] == "succeeded" and status["every"] == 3600
    assert json.dumps(status)  # state.json and /status carry it as JSON
