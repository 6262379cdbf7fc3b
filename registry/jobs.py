"""The job queue on the catalog database: enqueue with dedup, claim with a lease, heartbeat, finish."""
from __future__ import annotations

import contextvars
import functools
import os
import socket
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, or_, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from .db import db_now
from .errors import BadInput, JobCancelled, LeaseLost, NotFound
from .models import JOB_STATES, UNFINISHED_STATES, Job
from .schema import DEFAULT_LEASE_SECONDS, stored_dedup_key  # there so the CLI can use them without SQLAlchemy

MAX_BACKOFF_SECONDS = 300
# PostgreSQL NOTIFY channel: workers LISTEN on it and wake when a job becomes runnable (workers/wakeup.py).
NOTIFY_CHANNEL = "registry_jobs"


# (job id, lease owner) of the job this thread runs for a worker; registration checks it (the fencing check).
current_lease: contextvars.ContextVar[tuple[int, str] | None] = contextvars.ContextVar("current_lease", default=None)


@functools.cache  # read once: gc asks for every pin it looks at
def this_host() -> str:
    """The hostname, plus (on Linux) the boot id and the PID namespace: a pid means this process table only.

    Owners found dead on this host lose their leases and blob pins at once (owner_is_dead), so two machines
    that share a hostname, or containers that share the host's hostname but not its pids (host networking),
    must not pass for one host."""
    host = socket.gethostname()[:160]
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
        pid_ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return host  # no /proc: the hostname alone
    return f"{host}~{boot}.{pid_ns}"


def worker_id() -> str:
    """A name for this process that is unique across hosts: host:pid:random."""
    return f"{this_host()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def enqueue(session: Session, type: str, params: dict[str, Any], dedup_key: str | None = None,
            max_attempts: int = 3, after: int | None = None) -> tuple[Job, bool]:
    """Queue a job; returns (job, created). An unfinished job with the same dedup key is returned instead.

    The key is stored as `type:sha256(key)`, so any request (hundreds of include globs, a long path) fits the
    column; the readable request is in `params`. With `after`, the job runs only once job `after` succeeded
    (and fails with the reason when that one fails or is cancelled).
    """
    if dedup_key is not None:
        dedup_key = stored_dedup_key(type, dedup_key)
        existing = _unfinished(session, dedup_key)
        if existing is not None:
            return existing, False
    now = db_now(session)
    if after is not None:
        # Lock the parent row (PostgreSQL) so a concurrent fail either commits first (seen below) or waits
        # for this child to commit (and then fails it): never a child left waiting for a failed parent.
        query = select(Job).where(Job.id == after).execution_options(populate_existing=True)
        if session.get_bind().dialect.name == "postgresql":
            query = query.with_for_update()
        if session.scalars(query).first() is None:
            raise NotFound(f"no job {after} to run after; see registry jobs")
    job = Job(type=type, params=params, dedup_key=dedup_key, max_attempts=max_attempts, state="queued",
              run_after=now, created_at=now, after_job_id=after)
    try:
        with session.begin_nested():
            session.add(job)
    except IntegrityError:  # lost the race to an identical request (PostgreSQL)
        existing = _unfinished(session, dedup_key)
        if existing is None:
            raise
        return existing, False
    if after is not None:
        parent = get(session, after)
        if parent.state in ("failed", "cancelled"):
            _fail_dependents(session, parent, now)
    notify(session, type)
    return job, True


def notify(session: Session, job_type: str) -> None:
    """Wake the workers LISTENing on PostgreSQL when this transaction commits (SQLite workers poll)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_notify(:channel, :type)"), {"channel": NOTIFY_CHANNEL, "type": job_type})


def _unfinished(session: Session, dedup_key: str) -> Job | None:
    return session.scalars(select(Job).where(Job.dedup_key == dedup_key, Job.state.in_(UNFINISHED_STATES))).first()


def claim(session: Session, owner: str, lease_seconds: float = DEFAULT_LEASE_SECONDS,
          types: list[str] | None = None, job_id: int | None = None) -> Job | None:
    """Take the oldest runnable job (queued, or running with an expired lease) and lease it to `owner`."""
    now = db_now(session)
    parent = aliased(Job)
    parent_done = select(parent.id).where(parent.id == Job.after_job_id, parent.state == "succeeded").exists()
    query = (select(Job)
             .where(or_((Job.state == "queued") & (Job.run_after <= now),
                        (Job.state == "running") & (Job.lease_expires_at < now)))
             .where(Job.after_job_id.is_(None) | parent_done)
             .order_by(Job.run_after, Job.id).limit(1))
    if types:
        query = query.where(Job.type.in_(types))
    if job_id is not None:
        query = query.where(Job.id == job_id)
    if session.get_bind().dialect.name == "postgresql":
        # Rows another worker is claiming are skipped, not waited for.
        query = query.with_for_update(skip_locked=True)
    # On SQLite the session's transaction began with BEGIN IMMEDIATE, so this select-then-update is atomic.
    while True:
        job = session.scalars(query).first()
        if job is None:
            return None
        if job.state == "running" and job.attempts >= job.max_attempts:
            _finish(job, "failed", now, error=f"worker {job.lease_owner} stopped responding; no attempts left",
                    exit_code=1)
            _fail_dependents(session, job, now)
            session.flush()
            continue
        job.state, job.lease_owner, job.attempts = "running", owner, job.attempts + 1
        job.lease_expires_at = now + timedelta(seconds=lease_seconds)
        job.heartbeat_at = job.started_at = now
        job.error = None
        session.flush()
        return job


def seconds_until_due(session: Session, types: list[str] | None = None) -> float | None:
    """Seconds until the next job that nobody will announce becomes claimable: a retry whose backoff ends, or
    a lease that runs out. An idle worker sleeps that long (bounded by its poll) instead of polling blindly."""
    now = db_now(session)
    queued = select(func.min(Job.run_after)).where(Job.state == "queued", Job.run_after > now)
    leased = select(func.min(Job.lease_expires_at)).where(Job.state == "running")
    if types:
        queued, leased = queued.where(Job.type.in_(types)), leased.where(Job.type.in_(types))
    times = [t for t in (session.scalar(queued), session.scalar(leased)) if t is not None]
    if not times:
        return None
    return max(0.0, (min(times) - now).total_seconds())


def owner_is_dead(owner: str | None) -> bool:
    """True when the lease owner is a process on this host that no longer exists (killed, crashed)."""
    if not owner or owner.count(":") < 2:
        return False
    host, pid, _ = owner.rsplit(":", 2)
    if host != this_host() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def expire_lease(session: Session, job_id: int) -> None:
    """Let the job be claimed at once (its owner is known to be dead)."""
    job = get(session, job_id)
    if job.state == "running":
        job.lease_expires_at = db_now(session) - timedelta(seconds=1)
        notify(session, job.type)


def expire_leases_of_process(session: Session, pid: int, host: str | None = None) -> list[int]:
    """Expire the leases held by a process known dead (a daemon's worker that crashed): its jobs are taken
    over at once instead of after the lease. Returns the job ids."""
    prefix = f"{host or this_host()}:{pid}:"
    running = session.scalars(select(Job).where(Job.state == "running", Job.lease_owner.startswith(prefix,
                                                                                                   autoescape=True)))
    ids = []
    for job in running:
        expire_lease(session, job.id)
        ids.append(job.id)
    return ids


def params_for_run(session: Session, job: Job) -> dict[str, Any]:
    """The job's params as its handler gets them: a job that runs after another and names a param in
    `from_after` gets the artifact that job made there (a pipeline's quantize gets its merge's result)."""
    params = dict(job.params)
    key = params.pop("from_after", None)
    if key and job.after_job_id is not None:
        parent = get(session, job.after_job_id)
        if parent.result_artifact_id is None:
            raise BadInput(f"job {job.id} needs the artifact of job {parent.id}, which made none")
        params[key] = parent.result_artifact_id
    return params


def _owned(session: Session, job_id: int, owner: str) -> Job:
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or job.state != "running" or job.lease_owner != owner:
        raise LeaseLost(f"job {job_id} is no longer leased to {owner}")
    return job


def check_fence(session: Session, job_id: int) -> None:
    """Raise LeaseLost unless the worker running this job still holds an unexpired lease on it.

    Called inside the transaction that registers a job's result: on SQLite that transaction holds the write
    lock (BEGIN IMMEDIATE), on PostgreSQL the job row is locked here, so no other worker can take the job over
    between this check and the commit. A stale worker (paused, partitioned, its lease taken over) can then
    never register a result. Outside a worker's job (a library call) there is nothing to check.
    """
    lease = current_lease.get()
    if lease is None or lease[0] != job_id:
        return
    owner = lease[1]
    query = select(Job).where(Job.id == job_id).execution_options(populate_existing=True)
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update()
    job = session.scalars(query).first()
    if job is None or job.state != "running" or job.lease_owner != owner:
        raise LeaseLost(f"job {job_id} was taken over by another worker; this attempt registers nothing")
    if job.lease_expires_at is None or job.lease_expires_at <= db_now(session):
        raise LeaseLost(f"the lease on job {job_id} expired before its result could be registered; "
                        "this attempt registers nothing")


def heartbeat(session: Session, job_id: int, owner: str, lease_seconds: float = DEFAULT_LEASE_SECONDS,
              done: int | None = None, total: int | None = None, unit: str | None = None,
              message: str | None = None) -> None:
    """Extend the lease and record progress; raises JobCancelled when a cancel was requested."""
    if renew(session, job_id, owner, lease_seconds, done, total, unit, message):
        raise JobCancelled(f"job {job_id} was cancelled")


def renew(session: Session, job_id: int, owner: str, lease_seconds: float = DEFAULT_LEASE_SECONDS,
          done: int | None = None, total: int | None = None, unit: str | None = None,
          message: str | None = None) -> bool:
    """Extend the lease (by the database's clock) and record progress; returns whether a cancel was requested."""
    job = _owned(session, job_id, owner)
    now = db_now(session)
    job.heartbeat_at, job.lease_expires_at = now, now + timedelta(seconds=lease_seconds)
    if done is not None:
        job.progress_done = done
    if total is not None:
        job.progress_total = total
    if unit is not None:
        job.progress_unit = unit
    if message is not None:
        job.message = message
    return bool(job.cancel_requested)


def complete(session: Session, job_id: int, owner: str, result: dict[str, Any] | None = None,
             result_artifact_id: int | None = None, message: str | None = None) -> Job:
    """Mark a leased job succeeded."""
    job = _owned(session, job_id, owner)
    job.result, job.result_artifact_id = result, result_artifact_id
    if job.progress_total is not None:
        job.progress_done = job.progress_total
    _finish(job, "succeeded", db_now(session), message=message, exit_code=0)
    if session.scalars(select(Job.id).where(Job.after_job_id == job_id).limit(1)).first() is not None:
        notify(session, job.type)  # its dependents are runnable now
    return job


def fail(session: Session, job_id: int, owner: str, error: str, exit_code: int = 1, retry: bool = True,
         result: dict[str, Any] | None = None) -> Job:
    """Record a failed attempt: requeue with exponential backoff while attempts remain, else fail."""
    job = _owned(session, job_id, owner)
    job.error, job.result = error, result
    now = db_now(session)
    if retry and job.attempts < job.max_attempts:
        job.state, job.lease_owner, job.lease_expires_at = "queued", None, None
        job.run_after = now + timedelta(seconds=min(MAX_BACKOFF_SECONDS, 2 ** job.attempts))
    else:
        _finish(job, "failed", now, error=error, exit_code=exit_code)
        _fail_dependents(session, job, now)
    return job


def release(session: Session, job_id: int, owner: str, message: str) -> Job:
    """Give a leased job back to the queue at once, uncounted: its worker is stopping, the job did not fail."""
    job = _owned(session, job_id, owner)
    job.state, job.lease_owner, job.lease_expires_at = "queued", None, None
    job.attempts = max(0, job.attempts - 1)
    job.run_after, job.message = db_now(session), message
    notify(session, job.type)
    return job


def mark_cancelled(session: Session, job_id: int, owner: str, message: str) -> Job:
    """The handler stopped after a cancel request."""
    job = _owned(session, job_id, owner)
    _finish(job, "cancelled", db_now(session), message=message, exit_code=1)
    _fail_dependents(session, job, db_now(session))
    return job


def cancel(session: Session, job_id: int) -> Job:
    """Cancel a queued job at once; ask a running one to stop at its next heartbeat."""
    job = get(session, job_id)
    if job.state == "queued":
        _finish(job, "cancelled", db_now(session), message="cancelled before it ran", exit_code=1)
        _fail_dependents(session, job, db_now(session))
    elif job.state == "running":
        job.cancel_requested = True
    return job


def _fail_dependents(session: Session, parent: Job, now: datetime) -> None:
    """Fail every queued job waiting for `parent` (and theirs in turn), saying which job failed and why."""
    reason = parent.error or parent.message or parent.state
    waiting = list(session.scalars(select(Job).where(Job.after_job_id == parent.id, Job.state == "queued")))
    for child in waiting:
        _finish(child, "failed", now, error=f"job {parent.id} ({parent.type}) it waited for {parent.state}: {reason}",
                exit_code=parent.exit_code or 1)
        _fail_dependents(session, child, now)


def _finish(job: Job, state: str, now: datetime, message: str | None = None, error: str | None = None,
            exit_code: int | None = None) -> None:
    job.state, job.finished_at, job.exit_code = state, now, exit_code
    job.lease_owner, job.lease_expires_at = None, None
    if message is not None:
        job.message = message
    if error is not None:
        job.error = error


def get(session: Session, job_id: int) -> Job:
    """A job by id, or NotFound."""
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"no job {job_id}; see registry jobs")
    return job


def list_jobs(session: Session, state: str | None = None, limit: int = 100) -> list[Job]:
    """Jobs, newest first, optionally in one state."""
    query = select(Job).order_by(Job.id.desc()).limit(limit)
    if state is not None:
        if state not in JOB_STATES:
            raise BadInput(f"unknown job state {state!r}; use one of: {', '.join(JOB_STATES)}")
        query = query.where(Job.state == state)
    return list(session.scalars(query))


def job_dict(job: Job) -> dict[str, Any]:
    """The JSON form of a job, as `registry job --json` prints it."""
    iso = lambda t: t and t.isoformat() + "Z"  # noqa: E731
    return {
        "id": job.id, "type": job.type, "state": job.state, "params": job.params, "attempts": job.attempts,
        "max_attempts": job.max_attempts, "lease_owner": job.lease_owner,
        "progress": {"done": job.progress_done, "total": job.progress_total, "unit": job.progress_unit},
        "message": job.message, "error": job.error, "exit_code": job.exit_code, "result": job.result,
        "result_artifact_id": job.result_artifact_id, "created_at": iso(job.created_at),
        "started_at": iso(job.started_at), "finished_at": iso(job.finished_at),
        "heartbeat_at": iso(job.heartbeat_at), "lease_expires_at": iso(job.lease_expires_at),
        "after": job.after_job_id,
    }
