"""The daemon's scheduled jobs: scrub (re-verify blobs at rest), gc (opt-in) and prune (old jobs and events).

A schedule never runs its job: each tick queues one `scrub`, `gc` or `prune` job when none of that type is
unfinished and the last one finished more than `every` ago, judged from the jobs table and queued with a
dedup key. So any number of daemons sharing one PostgreSQL catalog queue each job once per interval, and a
restarted daemon picks up where the table says it was.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from .. import jobs
from ..db import db_now
from ..models import Job
from ..schema import UNFINISHED_STATES
from .options import byte_rate, check_keys, duration
from .service import Service

log = logging.getLogger("registry.daemon")

DAY = 86400.0
DEFAULT_EVERY = DAY
DEFAULT_BANDWIDTH = 200e6  # bytes/s: re-reading the store must not starve serving
DEFAULT_OLDER_THAN = 30 * DAY
# A schedule looks at the jobs table this often (at most), whatever `every` is: cheap, and a job another
# daemon finished is noticed soon.
MAX_TICK_SECONDS = 60.0


@dataclass
class Schedule:
    """One scheduled job type: queue `job_type` with `params` every `every` seconds."""

    job_type: str
    every: float
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class ScheduleConfig:
    """The [scrub], [gc] and [prune] sections; None where a schedule is off (gc unless configured)."""

    scrub: Schedule | None = field(default_factory=lambda: Schedule("scrub", DEFAULT_EVERY,
                                                                    {"bandwidth": DEFAULT_BANDWIDTH}))
    gc: Schedule | None = None
    prune: Schedule | None = field(default_factory=lambda: Schedule("prune", DEFAULT_EVERY,
                                                                    {"older_than": DEFAULT_OLDER_THAN}))

    def schedules(self) -> list[Schedule]:
        return [s for s in (self.scrub, self.gc, self.prune) if s is not None]


# Each table's keys beyond `every` and `enabled`: name -> (default, parser).
_PARAMS: dict[str, dict[str, tuple[float, Any]]] = {
    "scrub": {"bandwidth": (DEFAULT_BANDWIDTH, byte_rate)},
    "gc": {},
    "prune": {"older_than": (DEFAULT_OLDER_THAN, duration)},
}


def parse_schedules(tables: dict[str, Any], problems: list[str]) -> ScheduleConfig:
    """The schedules from daemon.toml's [scrub], [gc] and [prune] tables (each optional); appends problems."""
    config = ScheduleConfig()
    for name, extra in _PARAMS.items():
        if name not in tables:
            continue
        t = check_keys(tables[name], ("every", "enabled", *extra), name, problems)
        schedule = None
        if _enabled(t, name, problems):
            params = {key: parse(t.get(key, default), f"{name}.{key}", problems)
                      for key, (default, parse) in extra.items()}
            schedule = Schedule(name, duration(t.get("every", DEFAULT_EVERY), f"{name}.every", problems), params)
        setattr(config, name, schedule)
    return config


def _enabled(table: dict[str, Any], where: str, problems: list[str]) -> bool:
    value = table.get("enabled", True)
    if not isinstance(value, bool):
        problems.append(f"{where}.enabled: {value!r} must be true or false")
        return True
    return value


class ScheduleService(Service):
    """Queues one job of its type per `every` across every daemon sharing the catalog."""

    def __init__(self, reg, schedule: Schedule):
        super().__init__()
        self.reg, self.schedule = reg, schedule
        self.name = f"schedule:{schedule.job_type}"
        self.interval = min(schedule.every, MAX_TICK_SECONDS)
        self.last_run: dict[str, Any] | None = None
        self.next_due_at: datetime | None = None
        self.current_job: dict[str, Any] | None = None  # the unfinished job of this type, queued by anyone

    def tick(self) -> None:
        with self.reg.session() as s:
            self._tick(s)

    def _tick(self, s: Session) -> None:
        job_type = self.schedule.job_type
        _lock_schedule(s, job_type)
        now = db_now(s)
        unfinished = s.scalars(select(Job).where(Job.type == job_type, Job.state.in_(UNFINISHED_STATES))
                               .order_by(Job.id).limit(1)).first()
        last = s.scalars(select(Job).where(Job.type == job_type, Job.state.not_in(UNFINISHED_STATES),
                                           Job.finished_at.is_not(None))
                         .order_by(Job.finished_at.desc(), Job.id.desc()).limit(1)).first()
        self.last_run = None if last is None else {
            "job_id": last.id, "state": last.state, "finished_at": _iso(last.finished_at),
            "message": last.error or last.message}
        if unfinished is None:
            # Due `every` after the last run ended, whatever its outcome: a failing job is not retried each tick.
            due = now if last is None else last.finished_at + timedelta(seconds=self.schedule.every)
            if due <= now:
                # The key names the slot (after which finished job), so a second daemon that gets past the
                # lock in the same instant attaches to this job instead of queuing another.
                slot = f"schedule:{job_type}:after:{last.id if last else 0}"
                unfinished, _ = jobs.enqueue(s, job_type, {**self.schedule.params, "by": "schedule"},
                                             dedup_key=slot)
                s.flush()
                log.info("%s: queued job %s", self.name, unfinished.id)
        if unfinished is not None:
            self.next_due_at = None  # due `every` after this one finishes
            self.current_job = {"job_id": unfinished.id, "state": unfinished.state,
                                "progress": {"done": unfinished.progress_done, "total": unfinished.progress_total,
                                             "unit": unfinished.progress_unit}}
            self.interval = min(self.schedule.every, MAX_TICK_SECONDS)
        else:
            self.next_due_at, self.current_job = due, None
            # Wake when it is due (not up to a minute late), but look at least every MAX_TICK_SECONDS.
            self.interval = max(0.05, min((due - now).total_seconds(), MAX_TICK_SECONDS))

    def status(self) -> dict[str, Any]:
        return {**super().status(), "job_type": self.schedule.job_type, "every": self.schedule.every,
                "params": self.schedule.params, "last_run": self.last_run,
                "next_due_at": _iso(self.next_due_at), "current_job": self.current_job, "summary": self.summary()}

    def summary(self) -> str:
        """One line for `registry daemon status`: e.g. `scrub every 24h at 200MB/s; last: job 12 succeeded at
        2025-01-01T03:00:00Z; next due 2025-01-02T03:00:00Z`."""
        what = f"{self.schedule.job_type} every {_span(self.schedule.every)}"
        if "bandwidth" in self.schedule.params:
            what += f" at {self.schedule.params['bandwidth'] / 1e6:g}MB/s"
        if "older_than" in self.schedule.params:
            what += f" (older than {_span(self.schedule.params['older_than'])})"
        last = self.last_run
        parts = [what, f"last: job {last['job_id']} {last['state']} at {last['finished_at']}" if last else "never run"]
        if self.current_job:
            job = self.current_job
            done, total = job["progress"]["done"], job["progress"]["total"]
            parts.append(f"now: job {job['job_id']} {job['state']}" + (f" {100 * done // total}%" if total else ""))
        elif self.next_due_at is not None:
            parts.append(f"next due {_iso(self.next_due_at)}")
        return "; ".join(parts)


def _iso(t: datetime | None) -> str | None:
    return t.isoformat(timespec="seconds") + "Z" if t is not None else None


def _span(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def _lock_schedule(s: Session, job_type: str) -> None:
    """Serialise the check-then-queue of one schedule across daemons: SQLite's write transaction (BEGIN
    IMMEDIATE) already does; on PostgreSQL a transaction-scoped advisory lock, so the reads below see every
    job another daemon queued or finished before."""
    if s.get_bind().dialect.name == "postgresql":
        key = int.from_bytes(hashlib.sha256(f"registry-schedule:{job_type}".encode()).digest()[:8], "big",
                             signed=True)
        s.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})


def schedule_services(reg, schedules: ScheduleConfig) -> list[Service]:
    """One service per configured schedule, for the supervisor to run."""
    return [ScheduleService(reg, schedule) for schedule in schedules.schedules()]
