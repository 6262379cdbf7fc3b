"""Running jobs: one claimed job with a heartbeat thread, the worker loop, and the CLI's in-process path."""
from __future__ import annotations

import importlib
import logging
import signal
import threading
import time
from typing import Callable

from registry import jobs
from registry.core import Registry
from registry.errors import DatabaseLocked, JobCancelled, LeaseLost, RegistryError
from registry.models import Job
from registry.progress import NullReporter, Reporter

from .context import HandlerResult, JobReporter

log = logging.getLogger("registry.worker")
Handler = Callable[[Registry, dict, JobReporter, int], HandlerResult]
# Job type -> handler module, imported on first use: merge and quantize pull in torch, which a pull or an
# import should not pay for (about a second, and 250 MB read from disk when the page cache is cold).
HANDLERS: dict[str, str] = {"import": "import_folder", "verify": "verify", "pull": "pull", "merge": "merge",
                            "quantize": "quantize"}


def handler_for(job_type: str) -> Handler:
    """The `handle` function of a job type's module in workers/."""
    return importlib.import_module(f"workers.{HANDLERS[job_type]}").handle
FINISHED = ("succeeded", "failed", "cancelled")


class Heartbeat(threading.Thread):
    """Extends the lease and stores progress every second; tells the reporter to stop on cancel."""

    def __init__(self, reg: Registry, job_id: int, owner: str, lease_seconds: float, reporter: JobReporter):
        super().__init__(daemon=True, name=f"heartbeat-{job_id}")
        self.reg, self.job_id, self.owner, self.lease = reg, job_id, owner, lease_seconds
        self.reporter = reporter
        self.done = threading.Event()

    def run(self) -> None:
        interval = min(1.0, self.lease / 3)
        while not self.done.wait(interval):
            try:
                with self.reg.session() as s:
                    jobs.heartbeat(s, self.job_id, self.owner, self.lease, self.reporter.done,
                                   self.reporter.total, self.reporter.unit)
            except (JobCancelled, LeaseLost) as exc:
                self.reporter.stop(exc)
                return
            except DatabaseLocked:
                continue  # try again at the next beat; the lease has slack for this

    def stop(self) -> None:
        self.done.set()
        self.join()


def run_job(reg: Registry, job_id: int, owner: str, lease_seconds: float = jobs.DEFAULT_LEASE_SECONDS,
            terminal: Reporter | None = None) -> Job:
    """Run a job already claimed by `owner` to its end and record the outcome; returns the final row."""
    with reg.session() as s:
        job = jobs.get(s, job_id)
        job_type, params = job.type, dict(job.params)
    reporter = JobReporter(job_id, terminal)
    beat = Heartbeat(reg, job_id, owner, lease_seconds, reporter)
    beat.start()
    try:
        try:
            outcome = handler_for(job_type)(reg, params, reporter, job_id)
        finally:
            beat.stop()  # before recording the outcome, so no heartbeat races it
    except LeaseLost:
        log.warning("job %s: lease lost to another worker; dropping this attempt", job_id)
        return _final(reg, job_id)
    except JobCancelled as exc:
        _record(reg, lambda s: jobs.mark_cancelled(s, job_id, owner, str(exc)))
    except RegistryError as exc:  # a deliberate, one-line error: retrying cannot help
        _record(reg, lambda s: jobs.fail(s, job_id, owner, str(exc), exc.exit_code, retry=False))
    except KeyboardInterrupt:
        _record(reg, lambda s: jobs.mark_cancelled(s, job_id, owner, "interrupted"))
        raise
    except Exception as exc:  # unexpected: worth another attempt after a backoff
        log.debug("job %s failed", job_id, exc_info=True)
        _record(reg, lambda s: jobs.fail(s, job_id, owner, f"{type(exc).__name__}: {exc}", 1, retry=True))
    else:
        if outcome.error:
            _record(reg, lambda s: jobs.fail(s, job_id, owner, outcome.error, outcome.exit_code, retry=False,
                                             result=outcome.result))
        else:
            _record(reg, lambda s: jobs.complete(s, job_id, owner, outcome.result, outcome.artifact_id,
                                                 outcome.message))
    finally:
        reporter.finish()
    return _final(reg, job_id)


def _record(reg: Registry, action: Callable) -> None:
    try:
        with reg.session() as s:
            action(s)
    except LeaseLost:
        log.warning("lease lost before the outcome could be recorded")


def _final(reg: Registry, job_id: int) -> Job:
    with reg.session() as s:
        return jobs.get(s, job_id)


def run_or_attach(reg: Registry, job_type: str, params: dict, dedup_key: str | None,
                  terminal: Reporter | None = None, detach: bool = False,
                  lease_seconds: float = jobs.DEFAULT_LEASE_SECONDS) -> Job:
    """The CLI path: queue the job (or find the identical one), then run it here or wait for whoever runs it."""
    with reg.session() as s:
        job, _ = jobs.enqueue(s, job_type, params, dedup_key)
        job_id = job.id
    if detach:
        return job
    owner = jobs.worker_id()
    terminal = terminal or NullReporter()
    started = False
    while True:
        with reg.session() as s:
            current = jobs.get(s, job_id)
            if current.state == "running" and jobs.owner_is_dead(current.lease_owner):
                jobs.expire_lease(s, job_id)  # a killed `registry` on this host: take over now, not after the lease
            claimed = jobs.claim(s, owner, lease_seconds, job_id=job_id)
            current = jobs.get(s, job_id)
        if claimed is not None:
            final = run_job(reg, job_id, owner, lease_seconds, terminal)
            if final.state != "queued":
                return final
            continue  # an unexpected error was queued for a retry: wait out the backoff and run it again
        if current.state in FINISHED:
            terminal.finish()
            return current
        if current.progress_total and not started:  # attached to a job another process runs
            terminal.start(current.progress_total, current.progress_unit or "B", f"job {job_id}")
            started = True
        if started:
            terminal.advance(max(0, current.progress_done - terminal.done))
        time.sleep(0.2)


def worker_loop(reg: Registry, owner: str | None = None, lease_seconds: float = jobs.DEFAULT_LEASE_SECONDS,
                poll_seconds: float = 1.0, once: bool = False, types: list[str] | None = None) -> int:
    """Claim and run jobs until stopped (SIGTERM/SIGINT finish the current job first); returns jobs run."""
    owner = owner or jobs.worker_id()
    stopping = threading.Event()

    def _stop(signum, _frame):
        stopping.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop)
    ran = 0
    log.info("worker %s started", owner)
    while not stopping.is_set():
        with reg.session() as s:
            job = jobs.claim(s, owner, lease_seconds, types)
            job_id = job.id if job else None
        if job_id is None:
            if once:
                break
            stopping.wait(poll_seconds)
            continue
        final = run_job(reg, job_id, owner, lease_seconds)
        ran += 1
        log.info("job %s %s: %s", job_id, final.state, final.error or final.message or "")
    return ran
