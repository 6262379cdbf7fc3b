"""Exactly-once queuing for the daemon's services: a Trigger row per cause, written with the job it queues.

`fire` inserts the trigger and queues the job(s) in the caller's transaction; the unique (source, key) makes
a second daemon, a restart after kill -9 or a rescan find the cause already handled and queue nothing.
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ..models import Job, Trigger


def trigger_key(subject: str) -> str:
    return hashlib.sha256(subject.encode()).hexdigest()


def seen(session: Session, source: str, subject: str) -> Trigger | None:
    """The trigger recorded for this cause, if any."""
    return session.scalars(select(Trigger).where(Trigger.source == source,
                                                 Trigger.key == trigger_key(subject))).first()


def fire(session: Session, source: str, subject: str, queue: Callable[[Session], Job | None],
         detail: dict[str, Any] | None = None) -> Job | None:
    """Record the cause and queue its job(s) once: `queue(session)` runs only when the cause is new, and
    returns the job to remember (the last of a chain). Returns None when it was already handled."""
    if seen(session, source, subject) is not None:
        return None
    try:
        with session.begin_nested():
            trigger = Trigger(source=source, key=trigger_key(subject), subject=subject, detail=detail or {})
            session.add(trigger)
            session.flush()
    except IntegrityError:  # another daemon recorded it a moment ago
        return None
    job = queue(session)
    trigger.job_id = job.id if job is not None else None
    return job
