"""Scrub: re-verify every blob at rest, oldest-verified first, within a bandwidth budget.

The daemon queues a `scrub` job on a schedule (daemon/schedules.py). It reads each blob in the store and
re-hashes it, never faster than the budget (a token bucket on reads, so serving is not starved), and stamps
each good blob's `verified_at` and stat stamp as it goes: an interrupted scrub resumes where it stopped,
because the next one starts with the blobs verified longest ago (never-verified ones first). A damaged or
missing blob marks every live artifact holding it `corrupt` (the same rule as `registry verify`), records a
`scrub_corrupt` event for each and queues one `repair` job per artifact, which fetches the blob again from
the artifact's source and checks it before it replaces the bad file.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from sqlalchemy import select

from . import jobs
from .catalog import record_event
from .core import Registry
from .models import Blob, utcnow
from .progress import NullReporter, Reporter
from .store import StatStamp
from .verify import mark_holders_corrupt

log = logging.getLogger("registry.scrub")
READ_CHUNK = 8 * 1024 * 1024
MIN_CHUNK = 64 * 1024
# Good blobs' stamps are written in batches (one short transaction per this many seconds), not one per blob:
# a store of many small files must not cost a write transaction each.
FLUSH_SECONDS = 2.0
FLUSH_BLOBS = 500


class TokenBucket:
    """Reads take tokens (bytes); tokens refill at `rate` per second up to `burst`. Starting empty, n bytes
    taken over any span cost at least (n - burst) / rate seconds, so the budget holds on average; a pause
    (a slow disk, the hashing itself) refills at most `burst` bytes of credit."""

    def __init__(self, rate: float, burst: float | None = None,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic):
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(MIN_CHUNK, rate / 10))
        self.tokens = 0.0
        self._sleep, self._clock = sleep, clock
        self._last = clock()

    def take(self, n: int) -> None:
        """Wait until `n` bytes may be read (they may exceed the burst: the debt is slept off first)."""
        now = self._clock()
        self.tokens = min(self.burst, self.tokens + (now - self._last) * self.rate)
        self._last = now
        self.tokens -= n
        if self.tokens < 0:
            self._sleep(-self.tokens / self.rate)


@dataclass
class ScrubResult:
    """What a scrub read and found; `corrupt` lists each bad blob with the artifacts it made corrupt."""

    blobs_total: int = 0
    blobs_checked: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    bandwidth: float | None = None
    corrupt: list[dict[str, Any]] = field(default_factory=list)  # {sha256, status, artifacts: [names]}
    repairs_queued: list[int] = field(default_factory=list)  # job ids (an unfinished one is reused)
    changed: list[str] = field(default_factory=list)  # replaced while being read (a repair): checked next time

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def scrub(reg: Registry, bandwidth: float | None = None, reporter: Reporter | None = None,
          job_id: int | None = None, sleep: Callable[[float], None] | None = None) -> ScrubResult:
    """Re-hash every blob in the catalog, oldest `verified_at` first, at most `bandwidth` bytes/s (None:
    unthrottled). Progress is in bytes; `reporter.check` (a job's cancel) is honoured while throttled."""
    reporter = reporter or NullReporter()
    check = getattr(reporter, "check", lambda: None)
    started = time.monotonic()
    with reg.read_session() as s:
        blobs = s.execute(select(Blob.sha256, Blob.size).order_by(Blob.verified_at.asc().nulls_first(),
                                                                    Blob.sha256)).all()
    result = ScrubResult(blobs_total=len(blobs), bandwidth=bandwidth)
    reporter.start(sum(size for _, size in blobs), "B", "scrubbing")
    bucket = TokenBucket(bandwidth, sleep=sleep or _interruptible_sleep(check)) if bandwidth else None
    chunk = READ_CHUNK if bucket is None else int(min(READ_CHUNK, max(MIN_CHUNK, bandwidth / 20)))
    good: dict[str, StatStamp] = {}
    last_flush = time.monotonic()
    try:
        for sha, size in blobs:
            status, stamp = _check_blob(reg, sha, size, chunk, bucket, reporter)
            result.blobs_checked += 1
            if status == "ok":
                result.bytes_read += size
                good[sha] = stamp
            elif status == "changed":
                result.changed.append(sha)
            else:
                if status == "mismatch":
                    result.bytes_read += size
                _mark_corrupt(reg, sha, status, job_id, result)
            if good and (len(good) >= FLUSH_BLOBS or time.monotonic() - last_flush >= FLUSH_SECONDS):
                _stamp_good(reg, good)
                good, last_flush = {}, time.monotonic()
    except BaseException:
        # Stopped (cancel, worker stopping, lease lost): keep what was checked, so the next scrub starts after
        # it; a failure to write that must not hide why we stopped.
        try:
            _stamp_good(reg, good)
        except Exception:  # noqa: BLE001
            log.warning("scrub stopped; could not record the %d blob(s) it had verified", len(good))
        raise
    _stamp_good(reg, good)
    reporter.finish()
    result.seconds = round(time.monotonic() - started, 3)
    return result


def _interruptible_sleep(check: Callable[[], None]) -> Callable[[float], None]:
    """Sleep in short slices, checking for a cancel or a stopping worker between them."""
    def sleep(seconds: float) -> None:
        end = time.monotonic() + seconds
        while True:
            check()
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.25))
    return sleep


def _check_blob(reg: Registry, sha: str, size: int, chunk: int, bucket: TokenBucket | None,
                reporter: Reporter) -> tuple[str, StatStamp | None]:
    """(ok | mismatch | missing | wrong_size | unreadable | changed, the stamp read before hashing when ok)."""
    path = reg.store.path(sha)
    try:
        before = StatStamp.of(path)
        if before.size != size:
            reporter.advance(size)
            return _unless_replaced(path, before, "wrong_size"), None
        digest = _hash_throttled(path, size, chunk, bucket, reporter)
    except FileNotFoundError:
        reporter.advance(size)
        return "missing", None
    except OSError as exc:
        if exc.errno != errno.EIO:
            raise  # e.g. permissions: a setup problem to report, not damage to repair
        reporter.advance(size)
        return "unreadable", None  # the disk cannot read it back: damage as much as a wrong byte
    if digest == sha:
        return "ok", before
    return _unless_replaced(path, before, "mismatch"), None


def _unless_replaced(path, before: StatStamp, status: str) -> str:
    """A repair renames a fresh copy over a blob file: when the file is not the one we read, say `changed`
    (checked again by the next scrub) instead of calling good content bad."""
    try:
        return status if StatStamp.of(path) == before else "changed"
    except FileNotFoundError:
        return "missing"


def _hash_throttled(path, size: int, chunk: int, bucket: TokenBucket | None, reporter: Reporter) -> str:
    digest = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    left = size
    with open(path, "rb", buffering=0) as f:
        while True:
            if bucket is not None and left > 0:
                bucket.take(min(chunk, left))  # before the read: the budget limits what the disk serves
            n = f.readinto(buf)
            if not n:
                return digest.hexdigest()
            digest.update(view[:n])
            left -= n
            reporter.advance(n)


def _stamp_good(reg: Registry, good: dict[str, StatStamp]) -> None:
    if not good:
        return
    now = utcnow()
    with reg.session() as s:
        for sha, stamp in good.items():
            blob = s.get(Blob, sha)
            if blob is not None:  # gc may have removed an unreferenced blob meanwhile
                blob.verified_at = now
                blob.stat_size, blob.stat_mtime_ns, blob.stat_inode = stamp.size, stamp.mtime_ns, stamp.inode


def _mark_corrupt(reg: Registry, sha: str, status: str, job_id: int | None, result: ScrubResult) -> None:
    """Mark the blob's artifacts corrupt, record why, and queue a repair for each: in one transaction, so a
    crash leaves no corrupt artifact without its repair job."""
    with reg.session() as s:
        if s.get(Blob, sha) is None:
            return  # gc removed it (rows first, then files): nothing references it, nothing is damaged
        marked = mark_holders_corrupt(s, {sha})
        names = []
        for artifact, _ in marked:
            repair_job, _ = jobs.enqueue(s, "repair", {"artifact_id": artifact.id, "name": artifact.name,
                                                       "by": "scrub"}, dedup_key=f"repair:{artifact.id}")
            s.flush()
            record_event(s, "scrub_corrupt", artifact.id, job_id, blob=sha, status=status,
                         paths=sorted(f.path for f in artifact.files if f.sha256 == sha),
                         repair_job=repair_job.id)
            if repair_job.id not in result.repairs_queued:
                result.repairs_queued.append(repair_job.id)
            names.append(artifact.name)
        result.corrupt.append({"sha256": sha, "status": status, "artifacts": names})

