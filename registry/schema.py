"""Facts about the catalog's schema that commands need before (or without) importing SQLAlchemy.

Importing SQLAlchemy costs about 0.25 s of start-up, so `registry --help` (which shows the kinds, job states
and the default lease as option choices and defaults) and the SQLite fast read path (fastread.py) take these
from here; models.py, db.py and jobs.py use the same values.
"""
from __future__ import annotations

import hashlib
import re

KINDS = ("base", "adapter", "merged", "quantized", "checkpoint", "gguf")
STATUSES = ("ready", "incomplete", "corrupt", "deleted")
ROLES = ("base", "adapter", "calibration", "source")
# Every job type a worker runs (workers/runner.py HANDLERS has one module per type).
JOB_TYPES = ("import", "verify", "pull", "merge", "quantize", "convert", "repair", "scrub", "gc", "prune")
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
UNFINISHED_STATES = ("queued", "running")
# What a `registry serve` token may do, each role including the ones before it: read browses and downloads,
# write also submits jobs and tags, admin also manages tokens and removes artifacts.
TOKEN_ROLES = ("read", "write", "admin")
# Ids are INTEGER columns, 32-bit on PostgreSQL: a larger id (or SQL OFFSET) from a user is bad input, not a
# database error.
MAX_ID = 2**31 - 1
DEFAULT_LEASE_SECONDS = 60  # how long a claimed job stays its worker's without a heartbeat (`worker --lease`)

# The newest migration; a test checks it against Alembic. Knowing it here lets every command check the schema
# with one query instead of importing Alembic (about 0.1 s of start-up).
SCHEMA_HEAD = "0006"


def stored_dedup_key(type: str, dedup_key: str) -> str:
    """The fixed-size form of a job's dedup key kept in the jobs table: `type:sha256(key)`."""
    return f"{type}:{hashlib.sha256(dedup_key.encode()).hexdigest()}"


DIGEST_RE = re.compile(r"^sha256:([0-9a-f]{8,64})$")


def digest_prefix(ref: str) -> str:
    """The lower-case `sha256:` prefix a ref gives once no tag or name matched it; else why it names nothing."""
    from .errors import BadInput, NotFound

    if DIGEST_RE.match(ref.lower()) is None:
        if ref.lower().startswith("sha256:"):
            raise BadInput(f"digest ref {ref!r} needs 'sha256:' and at least 8 hex digits")
        raise NotFound(f"no artifact, tag or digest named {ref!r}; see registry list")
    return ref.lower()


def check_one_match(ref: str, matches: list[tuple[str, str]]) -> None:
    """A digest prefix must name exactly one live artifact; `matches` holds (name, digest) of each it names."""
    from .errors import AmbiguousRef, NotFound

    if not matches:
        raise NotFound(f"no artifact with digest {ref}; see registry list")
    if len(matches) > 1:
        names = ", ".join(name for name, _ in matches)
        hint = "name one of them" if len({digest for _, digest in matches}) == 1 else "give more hex digits or a name"
        raise AmbiguousRef(f"digest prefix {ref} matches {len(matches)} artifacts ({names}); {hint}")
