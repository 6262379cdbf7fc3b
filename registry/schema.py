"""Facts about the catalog's schema that commands need before (or without) importing SQLAlchemy.

Importing SQLAlchemy costs about 0.25 s of start-up, so `registry --help` (which shows the kinds, job states
and the default lease as option choices and defaults) and the SQLite fast read path (fastread.py) take these
from here; models.py, db.py and jobs.py use the same values.
"""
from __future__ import annotations

import hashlib

KINDS = ("base", "adapter", "merged", "quantized", "checkpoint")
STATUSES = ("ready", "incomplete", "corrupt", "deleted")
ROLES = ("base", "adapter", "calibration", "source")
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
UNFINISHED_STATES = ("queued", "running")
DEFAULT_LEASE_SECONDS = 60  # how long a claimed job stays its worker's without a heartbeat (`worker --lease`)

# The newest migration; a test checks it against Alembic. Knowing it here lets every command check the schema
# with one query instead of importing Alembic (about 0.1 s of start-up).
SCHEMA_HEAD = "0004"


def stored_dedup_key(type: str, dedup_key: str) -> str:
    """The fixed-size form of a job's dedup key kept in the jobs table: `type:sha256(key)`."""
    return f"{type}:{hashlib.sha256(dedup_key.encode()).hexdigest()}"
