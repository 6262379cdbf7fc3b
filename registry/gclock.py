"""How gc and ingest agree on which blobs may be removed: the gc lock and blob pins.

The gc lock is exclusive for gc and shared for everyone who pins or registers blobs:
- PostgreSQL: advisory lock GC_LOCK_KEY; gc holds it at session level on its own connection (it must
  outlive gc's commit), others take it at transaction level (released by their commit).
- SQLite: `flock` on `<database>.gclock`; gc holds LOCK_EX, others LOCK_SH until their transaction ends.
Everybody takes it inside a transaction that has already begun. On SQLite that transaction holds the
database's write lock (BEGIN IMMEDIATE), so the order is always "write lock, then gc lock" and two
processes can never wait on each other in opposite order.

gc, holding the lock exclusively: reads references and live pins, deletes unreferenced unpinned blob
rows, COMMITS, deletes those files, then releases the lock. An ingest pins a digest (a committed row in
blob_pins, under the shared lock) before it checks whether the blob file exists; registration, under the
shared lock, checks every file is present with the right size, inserts its rows and drops its pins in
one transaction. So an artifact never references a missing blob, and a blob gc removed before it was
pinned is simply written again. Pins expire (PIN_TTL), so a crashed job's pins do not live forever; gc releases
at once those of a process gone from its own host (release_pins_of_gone_processes).

When an operation ends without registering what it pinned (a failed or cancelled job, a failed import or
pull), it hands those blobs to gc: in the transaction that drops its pins it gives each one that has no
catalog row an unreferenced row, as a removed artifact's blobs have. gc frees unreferenced, unpinned rows at
once, so the space a failed job used comes back with the next `registry gc`; only blob files nobody
accounts for (no row, no pin: a crashed writer's once its pins expired) wait out gc's grace period.
"""
from __future__ import annotations

import fcntl
import os
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterable, TypeVar

from sqlalchemy import delete, event, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from .config import Settings
from .db import db_now, get_engine, session_scope, translate_db_errors
from .errors import OperationFailed, RegistryError
from .jobs import owner_is_dead, this_host
from .models import Blob, BlobPin

GC_LOCK_KEY = 7412894  # PostgreSQL advisory lock id (migrations use 7412893)
PIN_TTL = timedelta(hours=24)
REGISTER_ATTEMPTS = 3
T = TypeVar("T")


class BlobVanished(OperationFailed):
    """Registration found blobs missing from the store (removed by gc before they were pinned)."""

    def __init__(self, shas: set[str]):
        self.shas = shas
        first = sorted(shas)[0][:12]
        super().__init__(f"blob {first} ({len(shas)} in all) vanished from the store during registration "
                         "(a concurrent registry gc removed it); run the command again")


def _is_sqlite(session_or_conn) -> bool:
    return session_or_conn.get_bind().dialect.name == "sqlite" if isinstance(session_or_conn, Session) \
        else session_or_conn.dialect.name == "sqlite"


def _lock_file(bind) -> Path | None:
    database = bind.engine.url.database  # an Engine or a Connection
    if not database or database == ":memory:":
        return None  # one process: nothing to exclude
    return Path(database).absolute().with_name(Path(database).name + ".gclock")


def hold_shared(session: Session) -> None:
    """Take the gc lock shared until this session's transaction ends (waits while gc is removing)."""
    if session.info.get("gc_lock_shared"):
        return
    if not _is_sqlite(session):
        session.execute(text("SELECT pg_advisory_xact_lock_shared(:k)"), {"k": GC_LOCK_KEY})
        _held_until_transaction_ends(session, True)  # PostgreSQL releases it at commit itself
        return
    session.execute(text("SELECT 1"))  # begin (BEGIN IMMEDIATE: the write lock) before the gc lock
    path = _lock_file(session.get_bind())
    if path is None:
        return
    fh = open(path, "a+b")
    fcntl.flock(fh, fcntl.LOCK_SH)
    _held_until_transaction_ends(session, fh)


def _held_until_transaction_ends(session: Session, held) -> None:
    session.info["gc_lock_shared"] = held
    session.info["gc_lock_root"] = session.get_transaction()
    if not event.contains(session, "after_transaction_end", _release_shared):  # once per session
        event.listen(session, "after_transaction_end", _release_shared)


def _release_shared(session: Session, transaction) -> None:
    """Close the shared gc lock when the transaction that took it ends (commit or rollback)."""
    if transaction is session.info.get("gc_lock_root"):
        session.info.pop("gc_lock_root", None)
        held = session.info.pop("gc_lock_shared", None)
        if held not in (None, True):
            held.close()


class GcSection:
    """The exclusive side: `with GcSection(settings) as s:` gives a session holding the gc lock exclusively.

    Commit the session when the rows are gone; delete files after that, still inside the `with`; the lock
    is released on exit.
    """

    def __init__(self, settings: Settings):
        self.settings = settings

    def __enter__(self) -> Session:
        self._translate = translate_db_errors(self.settings)
        self._translate.__enter__()
        self.conn = get_engine(self.settings).connect()
        self.session = Session(bind=self.conn, expire_on_commit=False)
        self._fh = None
        try:
            if _is_sqlite(self.conn):
                self.session.execute(text("SELECT 1"))  # BEGIN IMMEDIATE first: the write lock, then ours
                path = _lock_file(self.conn)
                if path is not None:
                    self._fh = open(path, "a+b")
                    fcntl.flock(self._fh, fcntl.LOCK_EX)
            else:
                # Session level: it survives our commit, until the files are gone too.
                self.session.execute(text("SELECT pg_advisory_lock(:k)"), {"k": GC_LOCK_KEY})
        except BaseException:
            self._close()
            raise
        return self.session

    def __exit__(self, *exc) -> None:
        try:
            self.session.rollback()  # a no-op after commit()
            if not _is_sqlite(self.conn):
                self.conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": GC_LOCK_KEY})
                self.conn.commit()
        finally:
            self._close()
            self._translate.__exit__(*exc)

    def _close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        self.session.close()
        self.conn.close()


class BlobPins:
    """Pins taken by this process (one owner id per Registry), in short committed transactions."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.owner = f"{this_host()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"  # jobs.owner_is_dead reads it

    def pin(self, shas: Iterable[str]) -> None:
        """Pin blobs for PIN_TTL from now (by the database's clock); renews pins we already hold."""
        shas = sorted(set(shas))
        if not shas:
            return
        with session_scope(self.settings) as s:
            hold_shared(s)
            expires = db_now(s) + PIN_TTL
            dialect = sqlite if _is_sqlite(s) else postgresql
            stmt = dialect.insert(BlobPin).values([dict(sha256=sha, owner=self.owner, expires_at=expires)
                                                   for sha in shas])
            s.execute(stmt.on_conflict_do_update(index_elements=["sha256", "owner"],
                                                 set_={"expires_at": expires}))

    def release_in(self, session: Session, shas: Iterable[str]) -> None:
        """Drop our pins on these blobs as part of `session`'s transaction (the one that references them)."""
        shas = sorted(set(shas))
        for i in range(0, len(shas), 500):
            session.execute(delete(BlobPin).where(BlobPin.owner == self.owner, BlobPin.sha256.in_(shas[i:i + 500])))

    def release(self, shas: Iterable[str], store=None) -> None:
        """Drop our pins on these blobs now (after a registration that changed nothing, or failed); with the
        `store`, hand the unregistered ones to gc (see the module docstring)."""
        shas = sorted(set(shas))
        with session_scope(self.settings) as s:
            if store is not None:
                _hand_to_gc(s, store, shas)
            self.release_in(s, shas)


def _hand_to_gc(session: Session, store, shas: list[str]) -> None:
    """Give each blob that is in the store but has no catalog row an unreferenced row, so the next gc frees it
    at once (its writer has ended) instead of keeping it for the orphan grace period."""
    known: set[str] = set()
    for i in range(0, len(shas), 500):
        known.update(session.scalars(select(Blob.sha256).where(Blob.sha256.in_(shas[i:i + 500]))))
    rows = []
    for sha in shas:
        if sha in known:
            continue
        try:
            st = os.stat(store.path(sha))
        except FileNotFoundError:
            continue
        rows.append(dict(sha256=sha, size=st.st_size, verified_at=None, stat_size=st.st_size,
                         stat_mtime_ns=st.st_mtime_ns, stat_inode=st.st_ino))
    dialect = sqlite if _is_sqlite(session) else postgresql
    for i in range(0, len(rows), 500):
        session.execute(dialect.insert(Blob).values(rows[i:i + 500]).on_conflict_do_nothing())


def release_all_pins(store) -> None:
    """Best effort: drop every pin this process holds, when a job ends (one job at a time per process), and
    hand what it wrote but did not register (a failed merge, quantize, import, pull) to the next gc."""
    pins = getattr(store, "pins", None)
    if pins is None:
        return
    try:
        with session_scope(pins.settings) as s:
            _hand_to_gc(s, store, sorted(s.scalars(select(BlobPin.sha256).where(BlobPin.owner == pins.owner))))
            s.execute(delete(BlobPin).where(BlobPin.owner == pins.owner))
    except (RegistryError, SQLAlchemyError):  # the job's own outcome matters more than a leftover pin
        pass


def release_pins_of_gone_processes(session: Session, store) -> None:
    """For gc, inside its exclusive section: a process killed or crashed on this host could not release its pins;
    release them for it (as release_all_pins would have), so what it stored goes at this gc, not after PIN_TTL.
    Owners on other hosts, or whose process this host cannot see, keep their pins until they expire."""
    for owner in sorted(set(session.scalars(select(BlobPin.owner).distinct()))):
        if owner_is_dead(owner):  # owner: host:pid:random, as for job leases
            _hand_to_gc(session, store, sorted(session.scalars(select(BlobPin.sha256).where(BlobPin.owner == owner))))
            session.execute(delete(BlobPin).where(BlobPin.owner == owner))


def release_pins(store, shas: Iterable[str]) -> None:
    """Best effort: drop this process's pins on these blobs when an operation ends, however it ended (a
    registration that changed nothing, or failed), handing unregistered ones to the next gc. A pin left
    behind only delays gc until it expires."""
    shas = list(shas)
    if getattr(store, "pins", None) is None or not shas:
        return
    try:
        store.pins.release(shas, store)
    except (RegistryError, SQLAlchemyError):  # e.g. the catalog's disk is full: keep the original error
        pass


def check_blobs_for_registration(session: Session, store, ingested: Iterable) -> None:
    """Inside the registering transaction: take the gc lock shared, make sure every blob is in the store
    with its size (else BlobVanished), and drop our pins on them (they become references at commit)."""
    ingested = list(ingested)
    hold_shared(session)
    missing = {i.sha256 for i in ingested if store.size(i.sha256) != i.size}
    if missing:
        raise BlobVanished(missing)
    if getattr(store, "pins", None) is not None:
        store.pins.release_in(session, (i.sha256 for i in ingested))


def register_retrying(register: Callable[[], T], reingest: Callable[[set[str]], None]) -> T:
    """Run `register`; when blobs vanished under it, `reingest` them and try again (REGISTER_ATTEMPTS in all).

    With pins this should not happen; it covers a pin that expired, or a blob that another process of the
    same owner unpinned."""
    for attempt in range(1, REGISTER_ATTEMPTS + 1):
        try:
            return register()
        except BlobVanished as exc:
            if attempt == REGISTER_ATTEMPTS:
                raise
            reingest(exc.shas)
    raise AssertionError("unreachable")
