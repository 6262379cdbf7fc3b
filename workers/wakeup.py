"""How an idle worker learns that a job may be waiting, without querying the queue over and over.

PostgreSQL: the worker LISTENs on jobs.NOTIFY_CHANNEL; enqueue, release, lease expiry and a finished job with
dependents NOTIFY it when their transaction commits, so a new job is picked up in milliseconds.
SQLite (one host): `PRAGMA data_version` on a connection of its own changes whenever another connection
commits, which costs microseconds to ask, so the worker looks every 0.1 s and claims only after a change.
Either way the caller still claims every `timeout` seconds: a retry whose backoff ended or a lease that ran
out is not announced by anyone.
"""
from __future__ import annotations

import logging
import sqlite3
import threading
import time

from registry import jobs
from registry.core import Registry
from registry.db import get_engine, is_sqlite

log = logging.getLogger("registry.worker")
SQLITE_LOOK_SECONDS = 0.2  # 4 idle workers asking 5 times a second cost about 0.2% of a core
# PostgreSQL: how often a waiting worker checks whether it was told to stop (a signal sets the event).
STOP_CHECK_SECONDS = 1.0


class JobWaiter:
    """`wait(timeout, stop)` returns when a job may be runnable, `stop` is set, or `timeout` passed."""

    def __init__(self, reg: Registry):
        engine = get_engine(reg.settings)
        self._sqlite: sqlite3.Connection | None = None
        self._pg = None
        self._version: int | None = None
        self._sqlite_path: str | None = None
        self._pg_conninfo: str | None = None
        if is_sqlite(engine):
            self._sqlite_path = engine.url.database
        else:
            self._pg_conninfo = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)

    def wait(self, timeout: float, stop: threading.Event) -> None:
        deadline = time.monotonic() + timeout
        try:
            if self._pg_conninfo is not None:
                self._wait_pg(deadline, stop)
            else:
                self._wait_sqlite(deadline, stop)
        except Exception as exc:  # noqa: BLE001 - a lost connection: fall back to a plain poll, reconnect next time
            log.debug("job wake-up channel failed (%s); polling", exc)
            self.close()
            stop.wait(max(0.0, deadline - time.monotonic()))

    def _wait_pg(self, deadline: float, stop: threading.Event) -> None:
        import psycopg

        if self._pg is None:
            self._pg = psycopg.connect(self._pg_conninfo, autocommit=True, connect_timeout=10)
            self._pg.execute(f"LISTEN {jobs.NOTIFY_CHANNEL}")
            return  # a job queued before LISTEN took effect would be missed: look at the queue once now
        while not stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            # Drain only once this generator has ended: it holds the connection's lock (not re-entrant) while
            # it runs, so a second notifies() inside the loop waits for ever.
            woken = list(self._pg.notifies(timeout=min(left, STOP_CHECK_SECONDS), stop_after=1))
            if woken:
                self._drain_pg()
                return

    def _drain_pg(self) -> None:
        """Several notifications for one burst of jobs need one claim attempt, not one each."""
        for _ in self._pg.notifies(timeout=0.001):  # 0 would mean "no timeout"
            pass

    def _wait_sqlite(self, deadline: float, stop: threading.Event) -> None:
        if self._sqlite is None:
            self._sqlite = sqlite3.connect(self._sqlite_path, timeout=1.0, check_same_thread=False)
            self._version = self._data_version()
        while not stop.wait(SQLITE_LOOK_SECONDS):
            version = self._data_version()
            if version != self._version:
                self._version = version
                return
            if time.monotonic() >= deadline:
                return

    def _data_version(self) -> int:
        return self._sqlite.execute("PRAGMA data_version").fetchone()[0]

    def close(self) -> None:
        for conn in (self._pg, self._sqlite):
            if conn is not None:
                try:
                    conn.close()
                except Exception:  # noqa: BLE001 - closing a broken connection
                    pass
        self._pg = self._sqlite = None
