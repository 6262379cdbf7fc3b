"""Pruning the catalog's history: finished jobs and events older than a cutoff (the daemon's `prune` job).

Never an unfinished job, and never a job something still points at: a trigger (the daemon's exactly-once
record of what queued it; its job_id would become NULL) or an unfinished job waiting for it (after_job_id;
it would lose its dependency). The last finished job of each type stays too: the daemon's schedules count
`every` from it (prune with older_than shorter than a scrub's `every` must not make scrub due at once). Deleting a job sets events.job_id and a finished child's after_job_id to
NULL (ON DELETE SET NULL); that is done explicitly too, so the outcome does not depend on the database
enforcing foreign keys. Rows go in batches, each its own short transaction, so workers are never held up.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, select, update

from .core import Registry
from .db import db_now
from .errors import BadInput
from .models import Event, Job, Trigger
from .schema import UNFINISHED_STATES

BATCH = 500
MAX_OLDER_THAN = 100 * 365 * 86400.0  # seconds: a century


@dataclass
class PruneResult:
    older_than: float  # seconds
    cutoff: str  # ISO time (UTC): rows from before it were candidates
    jobs_deleted: int = 0
    jobs_kept_referenced: int = 0  # old finished jobs kept: a trigger or unfinished job points at them, or the
    # last of their type
    events_deleted: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def prune(reg: Registry, older_than: float) -> PruneResult:
    """Delete finished jobs and events older than `older_than` seconds (by the database's clock)."""
    if (not isinstance(older_than, (int, float)) or isinstance(older_than, bool) or not math.isfinite(older_than)
            or not 0 < older_than <= MAX_OLDER_THAN):  # NaN, inf or 10,000 years would fail the date arithmetic
        raise BadInput(f"older_than={older_than!r}: give a positive number of seconds (e.g. 2592000 for 30 days)")
    with reg.read_session() as s:
        cutoff = db_now(s) - timedelta(seconds=older_than)
    result = PruneResult(float(older_than), cutoff.isoformat() + "Z")
    latest = _last_finished_of_each_type(reg)
    last_id = 0
    while True:
        with reg.session() as s:
            old = list(s.scalars(select(Job.id).where(Job.id > last_id, Job.state.not_in(UNFINISHED_STATES),
                                                      Job.finished_at < cutoff).order_by(Job.id).limit(BATCH)))
            if not old:
                break
            last_id = old[-1]
            # Read in the transaction that deletes: on SQLite it holds the write lock, so nothing can point at
            # a job between this read and the delete; on PostgreSQL the foreign keys order the two.
            kept = set(s.scalars(select(Trigger.job_id).where(Trigger.job_id.in_(old))))
            kept |= set(s.scalars(select(Job.after_job_id).where(Job.after_job_id.in_(old),
                                                                  Job.state.in_(UNFINISHED_STATES))))
            kept |= latest & set(old)
            doomed = [i for i in old if i not in kept]
            result.jobs_kept_referenced += len(kept)
            if doomed:
                s.execute(update(Event).where(Event.job_id.in_(doomed)).values(job_id=None))
                s.execute(update(Job).where(Job.after_job_id.in_(doomed)).values(after_job_id=None))
                result.jobs_deleted += s.execute(delete(Job).where(Job.id.in_(doomed))).rowcount
    while True:
        with reg.session() as s:
            ids = list(s.scalars(select(Event.id).where(Event.at < cutoff).order_by(Event.id).limit(BATCH)))
            if not ids:
                break
            result.events_deleted += s.execute(delete(Event).where(Event.id.in_(ids))).rowcount
    return result


def _last_finished_of_each_type(reg: Registry) -> set[int]:
    with reg.read_session() as s:
        types = list(s.scalars(select(Job.type).distinct()))
        return {s.scalars(select(Job.id).where(Job.type == t, Job.state.not_in(UNFINISHED_STATES),
                                               Job.finished_at.is_not(None))
                          .order_by(Job.finished_at.desc(), Job.id.desc()).limit(1)).first() for t in types} - {None}
