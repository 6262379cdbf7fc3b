"""Engine and sessions for SQLite or PostgreSQL, migrated to head on first use."""
from __future__ import annotations

import contextlib
import importlib.util
import re
import threading
from datetime import datetime
from pathlib import Path
from typing import Iterator

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError, ProgrammingError
from sqlalchemy.orm import Session, sessionmaker

from .config import Settings
from .errors import BadInput, DatabaseLocked, DatabaseUnavailable, DiskFull
from .schema import SCHEMA_HEAD  # the newest migration; schema.py says why it lives there

# Installed as registry.migrations (the repository's top-level migrations/ folder in a checkout).
MIGRATIONS_DIR = Path(importlib.util.find_spec("registry.migrations").origin).parent
_engines: dict[str, Engine] = {}
_migrated: set[str] = set()
_lock = threading.Lock()


def is_sqlite(url_or_engine) -> bool:
    """True when the URL or engine is SQLite."""
    url = str(getattr(url_or_engine, "url", url_or_engine))
    return url.startswith("sqlite")


# Execution option that marks a read-only session: on SQLite its transaction begins DEFERRED (no write lock).
READ_ONLY = "registry_read_only"


def _make_engine(settings: Settings) -> Engine:
    url = settings.database_url
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number ('postgresql://:x:')
        raise _bad_url(settings) from None
    if not is_sqlite(url):
        connect_args = {}
        if "connect_timeout" not in parsed.query:
            # Without it an unreachable host hangs a command (and a heartbeat) for the TCP timeout, minutes.
            connect_args["connect_timeout"] = 10
        try:
            return create_engine(url, pool_pre_ping=True, connect_args=connect_args)
        except ImportError as exc:  # a dialect whose driver is not installed (mysql://, postgresql+pg8000://)
            raise BadInput(f"REGISTRY_DATABASE_URL (or --database-url) {_hide_password(url)!r} needs the "
                           f"{exc.name or parsed.drivername} driver, which is not installed; use "
                           "postgresql+psycopg://user@host/registry (psycopg is installed with the registry)") from None
    if url.startswith("sqlite:///"):
        try:
            Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DatabaseUnavailable(f"cannot create the folder of {describe_database(settings)}: "
                                      f"{exc.strerror}; check REGISTRY_HOME (or --home) is writable") from None
    engine = create_engine(url, connect_args={"timeout": settings.busy_timeout_ms / 1000})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        # Let SQLAlchemy's begin event own transactions, so each one can start IMMEDIATE.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {settings.busy_timeout_ms}")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.execute("PRAGMA synchronous = NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        # IMMEDIATE takes the write lock up front: a deferred transaction that later writes can fail
        # with SQLITE_BUSY at once instead of waiting, which would break job claims under contention.
        # Read-only sessions begin DEFERRED: in WAL mode they never block a writer (a heartbeat), however long.
        conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(READ_ONLY) else "BEGIN IMMEDIATE")

    return engine


def get_engine(settings: Settings) -> Engine:
    """The process-wide engine for these settings, migrated to head."""
    with _lock, translate_db_errors(settings):
        engine = _engines.get(settings.database_url)
        if engine is None:
            engine = _engines[settings.database_url] = _make_engine(settings)
        if settings.database_url not in _migrated:
            migrate(engine)
            _migrated.add(settings.database_url)
    return engine


def db_now(session: Session) -> datetime:
    """Naive UTC now by the database's clock: the one clock every host sharing the catalog agrees on."""
    if session.get_bind().dialect.name == "sqlite":
        return datetime.fromisoformat(session.execute(text("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')")).scalar())
    # clock_timestamp, not now(): now() is frozen at the start of the transaction.
    return session.execute(text("SELECT clock_timestamp() AT TIME ZONE 'utc'")).scalar()


def alembic_config(connection: Connection | None = None):
    """An Alembic Config pointing at our migrations, optionally bound to a connection."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str | None:
    """The newest migration's revision id."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or None for an empty database."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        rev = MigrationContext.configure(conn).get_current_revision()
        conn.rollback()
    return rev


def _at_head(engine: Engine) -> bool:
    try:
        with engine.connect() as conn:
            version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
            conn.rollback()
    except (OperationalError, ProgrammingError):  # no alembic_version table yet: an empty database
        return False
    return version == SCHEMA_HEAD


def migrate(engine: Engine, revision: str = "head") -> None:
    """Upgrade the database to `revision`; concurrent callers serialise on a lock."""
    if revision == "head" and _at_head(engine):
        return
    from alembic import command

    with engine.connect() as conn:
        sqlite_conn = conn.connection.dbapi_connection if is_sqlite(engine) else None
        if sqlite_conn is not None:
            # A batch migration rebuilds a table (copy, DROP the old one, rename): with foreign keys on, dropping
            # `artifacts` would cascade-delete every file, edge and tag (0004 did). SQLite ignores this PRAGMA
            # inside a transaction, so it goes to the driver's connection before ours begins.
            sqlite_conn.execute("PRAGMA foreign_keys = OFF")
        try:
            with conn.begin():
                if sqlite_conn is None:
                    # SQLite's BEGIN IMMEDIATE already serialises; PostgreSQL needs an explicit lock.
                    conn.execute(text("SELECT pg_advisory_xact_lock(7412893)"))
                command.upgrade(alembic_config(conn), revision)
        finally:
            if sqlite_conn is not None:
                sqlite_conn.execute("PRAGMA foreign_keys = ON")


def dispose_all() -> None:
    """Forget cached engines (tests and forked workers)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
        _migrated.clear()


def describe_database(settings: Settings) -> str:
    """'the catalog database /x/registry.db' (or its URL, password hidden), for messages."""
    url = settings.database_url
    try:
        parsed = make_url(url)
    except ArgumentError:
        return f"the catalog database {_hide_password(url)}"
    if parsed.get_backend_name() == "sqlite":
        return f"the catalog database {parsed.database or ':memory:'}"
    return f"the catalog database {parsed.render_as_string(hide_password=True)}"


def _hide_password(url: str) -> str:
    return re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", url)


def _bad_url(settings: Settings) -> BadInput:
    return BadInput(f"REGISTRY_DATABASE_URL (or --database-url) {_hide_password(settings.database_url)!r} is "
                    "not a database URL we can use; give e.g. postgresql+psycopg://user@host/registry or "
                    "sqlite:////path/to/registry.db")


def _db_error(settings: Settings, exc: Exception) -> Exception | None:
    """The one-line registry error for a database failure, or None when it is not one we can explain."""
    if isinstance(exc, ArgumentError):  # includes NoSuchModuleError (unknown dialect or driver)
        return _bad_url(settings)
    if not isinstance(exc, DBAPIError):
        return None
    raw = str(exc.orig).strip()
    msg = raw.lower()
    what = describe_database(settings)
    if "disk is full" in msg:
        return DiskFull(f"disk full while writing {what}; free space and try again")
    if "database is locked" in msg or "busy" in msg:
        return DatabaseLocked(
            f"database is locked by another process (waited {settings.busy_timeout_ms / 1000:g}s); "
            "retry when it finishes, or raise REGISTRY_BUSY_TIMEOUT")
    if "unable to open database file" in msg or "readonly database" in msg or "read-only" in msg:
        return DatabaseUnavailable(f"cannot open {what} for writing: its folder is missing, read-only or not "
                                   "writable by this user; check REGISTRY_HOME (or --home), its permissions and mount")
    if "disk i/o error" in msg:
        return DatabaseUnavailable(f"disk I/O error on {what}; check the disk under it (dmesg, free space, "
                                   "a network mount that went away), then retry")
    if "file is not a database" in msg or "malformed" in msg:
        return DatabaseUnavailable(f"{what} is damaged or not a SQLite database ({raw}); restore it from a backup "
                                   "(do not delete it while the store holds blobs)")
    if not is_sqlite(settings.database_url) and isinstance(exc, OperationalError):
        # psycopg: 'connection failed: connection to server at "h", port 1 failed: Connection refused\n\tIs ...'
        reason = (raw.splitlines()[0].split(" failed: ")[-1].strip() if raw else "") or type(exc.orig).__name__
        reason = " ".join(reason.split())  # 'FATAL:  role "x" does not exist'
        if reason.startswith("FATAL:") or "authentication" in reason:  # the server answered: the URL is wrong
            return DatabaseUnavailable(f"cannot use {what}: {reason}; check the user, password and database "
                                       "name in REGISTRY_DATABASE_URL (or --database-url)")
        return DatabaseUnavailable(f"cannot use {what}: {reason}; check that the server is up and reachable, "
                                   "and REGISTRY_DATABASE_URL (or --database-url)")
    return None


@contextlib.contextmanager
def translate_db_errors(settings: Settings) -> Iterator[None]:
    """Turn database failures (locked, full, read-only, I/O error, damaged file, server down) into one line each."""
    try:
        yield
    except (ArgumentError, DBAPIError) as exc:
        translated = _db_error(settings, exc)
        if translated is None:
            raise
        raise translated from None



@contextlib.contextmanager
def session_scope(settings: Settings, write: bool = True) -> Iterator[Session]:
    """One short transaction: commit on success, roll back on error.

    `write=False` gives a read-only session: on SQLite it takes no write lock, so a long read (gc's walk, a
    listing) never stalls heartbeats or claims; it refuses to flush changes.
    """
    engine = get_engine(settings)
    if write:
        factory = sessionmaker(engine, expire_on_commit=False)
    else:
        factory = sessionmaker(engine.execution_options(**{READ_ONLY: True}), expire_on_commit=False,
                               info={READ_ONLY: True})
    with translate_db_errors(settings):
        with factory() as session, session.begin():
            yield session


@event.listens_for(Session, "before_flush")
def _refuse_writes_in_read_sessions(session, _flush_context, _instances):
    # A DEFERRED SQLite transaction that starts writing can fail with 'database is locked' without waiting.
    if session.info.get(READ_ONLY) and (session.new or session.dirty or session.deleted):
        raise RuntimeError("a read-only session (Registry.read_session) cannot write; use Registry.session")
