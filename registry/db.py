"""Engine and sessions for SQLite or PostgreSQL, migrated to head on first use."""
from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Iterator

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlalchemy.orm import Session, sessionmaker

from .config import Settings
from .errors import DatabaseLocked, DiskFull

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
# The newest migration; a test checks it against Alembic. Knowing it here lets every command check the schema
# with one query instead of importing Alembic (about 0.1 s of start-up).
SCHEMA_HEAD = "0002"
_engines: dict[str, Engine] = {}
_migrated: set[str] = set()
_lock = threading.Lock()


def is_sqlite(url_or_engine) -> bool:
    """True when the URL or engine is SQLite."""
    url = str(getattr(url_or_engine, "url", url_or_engine))
    return url.startswith("sqlite")


def _make_engine(settings: Settings) -> Engine:
    url = settings.database_url
    if not is_sqlite(url):
        return create_engine(url, pool_pre_ping=True)
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
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
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def get_engine(settings: Settings) -> Engine:
    """The process-wide engine for these settings, migrated to head."""
    with _lock:
        engine = _engines.get(settings.database_url)
        if engine is None:
            engine = _engines[settings.database_url] = _make_engine(settings)
        if settings.database_url not in _migrated:
            with translate_locked(settings):
                migrate(engine)
            _migrated.add(settings.database_url)
    return engine


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

    with engine.begin() as conn:
        if not is_sqlite(engine):
            # SQLite's BEGIN IMMEDIATE already serialises; PostgreSQL needs an explicit lock.
            conn.execute(text("SELECT pg_advisory_xact_lock(7412893)"))
        command.upgrade(alembic_config(conn), revision)


def dispose_all() -> None:
    """Forget cached engines (tests and forked workers)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
        _migrated.clear()


@contextlib.contextmanager
def translate_locked(settings: Settings) -> Iterator[None]:
    """Turn SQLite's 'database is locked' and 'disk is full' into one-line registry errors."""
    try:
        yield
    except OperationalError as exc:
        if "disk is full" in str(exc.orig).lower():
            raise DiskFull("disk full while writing the catalog database; free space and try again") from None
        if "locked" in str(exc.orig).lower() or "busy" in str(exc.orig).lower():
            raise DatabaseLocked(
                f"database is locked by another process (waited {settings.busy_timeout_ms / 1000:g}s); "
                "retry when it finishes, or raise REGISTRY_BUSY_TIMEOUT") from None
        raise


@contextlib.contextmanager
def session_scope(settings: Settings) -> Iterator[Session]:
    """One short transaction: commit on success, roll back on error."""
    factory = sessionmaker(get_engine(settings), expire_on_commit=False)
    with translate_locked(settings):
        with factory() as session, session.begin():
            yield session
