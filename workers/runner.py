"""Running jobs: one claimed job with a heartbeat thread, the worker loop, and the CLI's in-process path."""
from __future__ import annotations

import _thread
import importlib
import logging
import signal
import threading
import time
from typing import Callable

from registry import jobs
from registry.core import Registry
from registry.db import db_now
from registry.errors import JobCancelled, LeaseLost, RegistryError, WorkerStopped
from registry.gclock import release_all_pins
from registry.ml import require_ml
from registry.models import Job
from registry.progress import NullReporter, Reporter

from .context import HandlerResult, JobReporter

log = logging.getLogger("registry.worker")
Handler = Callable[[Registry, dict, JobReporter, int], HandlerResult]
# Job type -> handler module, imported on first use: merge and quantize pull in torch, which a pull or an
# import should not pay for (about a second, and 250 MB read from disk when the page cache is cold).
HANDLERS: dict[str, str] = {"import": "import_folder", "verify": "verify", "pull": "pull", "merge": "merge",
                            "quantize": "quantize", "convert": "convert", "repair": "repair", "scrub": "scrub",
                            "gc": "gc", "prune": "prune"}
ML_JOBS = ("merge", "quantize", "convert")


def handler_for(job_type: str) -> Handler:
    """The `handle` function of a job type's module in workers/."""
    if job_type in ML_JOBS:
        require_ml(job_type)  # before the import, which would fail with a bare ImportError
    return importlib.import_module(f"registry.workers.{HANDLERS[job_type]}").handle
FINISHED = ("succeeded", "failed", "cancelled")


class Heartbeat(threading.Thread):
    """Renews the lease and stores progress every second; tells the reporter to stop on cancel or lost lease.

    It survives any error (a database restart, a locked SQLite file, a network blip) and keeps trying; when it
    could not renew the lease before the lease runs out, the job is stopped at its next progress call, so a
    worker never runs on past the lease that another worker may already have taken over.
    """

    def __init__(self, reg: Registry, job_id: int, owner: str, lease_seconds: float, reporter: JobReporter):
        super().__init__(daemon=True, name=f"heartbeat-{job_id}")
        self.reg, self.job_id, self.owner, self.lease = reg, job_id, owner, lease_seconds
        self.reporter = reporter
        self.interval = min(1.0, lease_seconds / 3)
        self.done = threading.Event()
        # The claim that leased the job just committed; stop one beat before that lease would run out.
        reporter.lease_safe_until = time.monotonic() + lease_seconds - self.interval

    def run(self) -> None:
        failing = False
        while not self.done.wait(self.interval):
            sent = time.monotonic()
            try:
                with self.reg.session() as s:
                    cancel = jobs.renew(s, self.job_id, self.owner, self.lease, self.reporter.done,
                                        self.reporter.total, self.reporter.unit)
            except LeaseLost as exc:
                self.reporter.stop(exc)
                return
            except Exception as exc:  # noqa: BLE001 - any failure: keep trying while the lease lasts
                if not failing:
                    log.warning("job %s: heartbeat failed (%s); retrying", self.job_id, exc)
                failing = True
                if time.monotonic() > self.reporter.lease_safe_until:
                    self.reporter.stop(LeaseLost(f"could not renew the lease on job {self.job_id} before it "
                                                 f"expired ({exc}); stopping this attempt"))
                    return
                continue
            failing = False
            # The database set the expiry `lease` seconds after it received the renewal, so after `sent`.
            self.reporter.lease_safe_until = sent + self.lease - self.interval
            if cancel:  # keep beating until the handler stops, so nobody takes the job over meanwhile
                self.reporter.stop(JobCancelled(f"job {self.job_id} was cancelled"))

    def stop(self) -> None:
        self.done.set()
        self.join()


class StopSignals:
    """SIGTERM/SIGINT for `registry worker`.

    The first signal stops claiming and lets the current job finish within `grace` seconds; a second signal,
    or the grace period running out, stops the job now and re-queues it (never cancels it: it is someone's job).
    """

    def __init__(self, grace_seconds: float):
        self.grace = grace_seconds
        self.stopping = threading.Event()
        self.reporter: JobReporter | None = None  # set while a handler runs
        self._timer: threading.Timer | None = None

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def job_started(self, reporter: JobReporter) -> None:
        self.reporter = reporter
        if self.stopping.is_set():
            self._start_grace()

    def job_ended(self) -> None:
        self.reporter = None
        if self._timer is not None:
            self._timer.cancel()

    def _start_grace(self) -> None:
        log.warning("stopping: letting job %s finish (up to %gs); signal again to re-queue it and exit now",
                    self.reporter.job_id, self.grace)
        # interrupt_main runs _on_signal in the main thread, as a second signal would.
        self._timer = threading.Timer(self.grace, _thread.interrupt_main, args=(signal.SIGTERM,))
        self._timer.daemon = True
        self._timer.start()

    def _on_signal(self, signum, _frame) -> None:
        if not self.stopping.is_set():
            self.stopping.set()
            if self.reporter is not None:
                self._start_grace()
            return
        reporter = self.reporter
        if reporter is not None:
            stop = WorkerStopped(f"worker stopped (signal {signum}) before job {reporter.job_id} finished")
            reporter.stop(stop)  # threads of the handler stop at their next progress call
            raise stop  # the handler's own thread stops here; run_job re-queues the job


def run_job(reg: Registry, job_id: int, owner: str, lease_seconds: float = jobs.DEFAULT_LEASE_SECONDS,
            terminal: Reporter | None = None, cancel_on_interrupt: bool = True,
            signals: StopSignals | None = None, raise_unexpected: bool = False) -> Job:
    """Run a job already claimed by `owner` to its end and record the outcome; returns the final row.

    Ctrl-C (KeyboardInterrupt) cancels the job when `cancel_on_interrupt`, else gives it back to the queue.
    With `raise_unexpected` (the CLI), an unexpected error that failed the job for good is raised once recorded,
    so the command reports it as any unexpected error: with the --debug hint, or the traceback.
    """
    unexpected: Exception | None = None
    with reg.read_session() as s:
        job = jobs.get(s, job_id)
        job_type = job.type
        try:
            params = jobs.params_for_run(s, job)
        except RegistryError as exc:
            params_error = exc
        else:
            params_error = None
    if params_error is not None:
        _record(reg, lambda s: jobs.fail(s, job_id, owner, str(params_error), params_error.exit_code, retry=False))
        return _final(reg, job_id)
    reporter = JobReporter(job_id, terminal)
    beat = Heartbeat(reg, job_id, owner, lease_seconds, reporter)
    beat.start()
    lease_token = jobs.current_lease.set((job_id, owner))  # registration checks it (the fencing check)
    try:
        try:
            if signals is not None:
                signals.job_started(reporter)
            try:
                outcome = handler_for(job_type)(reg, params, reporter, job_id)
            finally:
                if signals is not None:
                    signals.job_ended()
        finally:
            beat.stop()  # before recording the outcome, so no heartbeat races it
    except LeaseLost as exc:
        log.warning("job %s: %s; dropping this attempt", job_id, exc)
        return _final(reg, job_id)
    except WorkerStopped:
        _record(reg, lambda s: jobs.release(s, job_id, owner, "re-queued: its worker was stopped"))
        raise
    except JobCancelled as exc:
        _record(reg, lambda s: jobs.mark_cancelled(s, job_id, owner, str(exc)))
    except RegistryError as exc:  # a deliberate, one-line error: retrying cannot help
        _record(reg, lambda s: jobs.fail(s, job_id, owner, str(exc), exc.exit_code, retry=False))
    except KeyboardInterrupt:
        if cancel_on_interrupt:
            _record(reg, lambda s: jobs.mark_cancelled(s, job_id, owner, "interrupted"))
        else:  # someone else's request this command attached to: give it back, another run finishes it
            _record(reg, lambda s: jobs.release(s, job_id, owner, "re-queued: interrupted"))
        raise
    except Exception as exc:  # unexpected: worth another attempt after a backoff
        log.debug("job %s failed", job_id, exc_info=True)
        _record(reg, lambda s: jobs.fail(s, job_id, owner, f"{type(exc).__name__}: {exc}", 1, retry=True))
        unexpected = exc
    else:
        if outcome.error:
            _record(reg, lambda s: jobs.fail(s, job_id, owner, outcome.error, outcome.exit_code, retry=False,
                                             result=outcome.result))
        else:
            def succeed(s):
                # The last progress first: a job shorter than one heartbeat would otherwise keep none (metrics
                # sum the bytes of succeeded jobs).
                if reporter.total is not None:
                    jobs.renew(s, job_id, owner, lease_seconds, reporter.done, reporter.total, reporter.unit)
                jobs.complete(s, job_id, owner, outcome.result, outcome.artifact_id, outcome.message)
            _record(reg, succeed)
    finally:
        jobs.current_lease.reset(lease_token)
        release_all_pins(reg.store)
        reporter.finish()
    final = _final(reg, job_id)
    if unexpected is not None and raise_unexpected and final.state == "failed":
        raise unexpected
    return final


def _record(reg: Registry, action: Callable) -> None:
    try:
        with reg.session() as s:
            action(s)
    except LeaseLost:
        log.warning("lease lost before the outcome could be recorded")


def _final(reg: Registry, job_id: int) -> Job:
    with reg.read_session() as s:
        return jobs.get(s, job_id)


def run_or_attach(reg: Registry, job_type: str, params: dict, dedup_key: str | None,
                  terminal: Reporter | None = None, detach: bool = False,
                  lease_seconds: float = jobs.DEFAULT_LEASE_SECONDS) -> Job:
    """The CLI path: queue the job (or find the identical one), then run it here or wait for whoever runs it.

    An unexpected error that ends the job's last attempt here is raised (the CLI prints it with the --debug hint)."""
    with reg.session() as s:
        job, created = jobs.enqueue(s, job_type, params, dedup_key)
        job_id = job.id
    if detach:
        return job
    owner = jobs.worker_id()
    terminal = terminal or NullReporter()
    started = False
    while True:
        with reg.read_session() as s:  # polling takes no write lock; only a claim does
            current = jobs.get(s, job_id)
            runnable = _runnable(current, db_now(s))
        if runnable:
            with reg.session() as s:
                current = jobs.get(s, job_id)
                if current.state == "running" and jobs.owner_is_dead(current.lease_owner):
                    jobs.expire_lease(s, job_id)  # a killed `registry` on this host: take over now
                claimed = jobs.claim(s, owner, lease_seconds, job_id=job_id)
                current = jobs.get(s, job_id)
            if claimed is not None:
                # Ctrl-C cancels only a job this command queued; one it attached to goes back to the queue.
                final = run_job(reg, job_id, owner, lease_seconds, terminal, cancel_on_interrupt=created,
                                raise_unexpected=True)
                if final.state in FINISHED:
                    return final
                continue  # queued for a retry (wait out the backoff), or our lease was lost: look again
        if current.state in FINISHED:
            terminal.finish()
            return current
        if current.progress_total and not started:  # attached to a job another process runs
            terminal.start(current.progress_total, current.progress_unit or "B", f"job {job_id}")
            started = True
        if started:
            terminal.advance(max(0, current.progress_done - terminal.done))
        time.sleep(0.2)


def _runnable(job: Job, now) -> bool:
    """Whether a claim could take this job now (read first, so waiting never holds the write lock)."""
    if job.state == "queued":
        return job.run_after <= now
    if job.state == "running":
        return (job.lease_expires_at is not None and job.lease_expires_at < now) or jobs.owner_is_dead(job.lease_owner)
    return False


def configure_logging(debug: bool) -> None:
    """`registry worker`'s log: its own lines (worker started, job finished) at INFO, libraries at WARNING (httpx
    logs every HTTP request at INFO). With --debug the root logger is already at DEBUG for everything."""
    if debug:
        return
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("registry").setLevel(logging.INFO)


def worker_loop(reg: Registry, owner: str | None = None, lease_seconds: float = jobs.DEFAULT_LEASE_SECONDS,
                poll_seconds: float = 1.0, once: bool = False, types: list[str] | None = None,
                grace_seconds: float = 30.0) -> int:
    """Claim and run jobs until stopped; returns the number of jobs run.

    Between jobs it waits for a new one without querying the queue: PostgreSQL NOTIFY wakes it, on SQLite it
    watches the database file change (wakeup.py); every `poll_seconds` it looks anyway (a retry whose backoff
    ended, a lease that expired). SIGTERM/SIGINT: the current job may finish within `grace_seconds`; a second
    signal (or the grace running out) re-queues it and raises WorkerStopped.
    """
    from .wakeup import JobWaiter

    owner = owner or jobs.worker_id()
    signals = StopSignals(grace_seconds)
    if threading.current_thread() is threading.main_thread():
        signals.install()
    log.info("worker %s started%s", owner, f" for {', '.join(types)} jobs" if types else "")
    waiter = None if once else JobWaiter(reg)
    try:
        return _claim_and_run(reg, owner, lease_seconds, poll_seconds, once, types, signals, waiter)
    finally:
        if waiter is not None:
            waiter.close()


def _claim_and_run(reg, owner, lease_seconds, poll_seconds, once, types, signals, waiter) -> int:
    ran = 0
    while not signals.stopping.is_set():
        with reg.session() as s:
            job = jobs.claim(s, owner, lease_seconds, types)
            job_id = job.id if job else None
            due = None if job or once else jobs.seconds_until_due(s, types)
        if job_id is None:
            if once:
                break
            # A new job wakes the waiter; a retry after its backoff or an expired lease does not, so wake for it.
            waiter.wait(poll_seconds if due is None else min(poll_seconds, due + 0.05), signals.stopping)
            continue
        if signals.stopping.is_set():  # a signal came while claiming: do not start it
            with reg.session() as s:
                jobs.release(s, job_id, owner, "re-queued: its worker was stopped")
            break
        final = run_job(reg, job_id, owner, lease_seconds, signals=signals)
        ran += 1
        log.info("job %s %s: %s", job_id, final.state, final.error or final.message or "")
    return ran
