"""The Registry handle: settings, store and database sessions in one object."""
from __future__ import annotations

import contextlib
import os
from contextlib import AbstractContextManager
from pathlib import Path

from sqlalchemy.orm import Session

from .config import Settings, load_settings
from .db import get_engine, session_scope
from .errors import DatabaseUnavailable
from .gclock import BlobPins
from .store import LocalStore


class Registry:
    """Entry point of the library: `Registry()` uses REGISTRY_HOME and REGISTRY_DATABASE_URL."""

    def __init__(self, home: str | os.PathLike | None = None, database_url: str | None = None):
        self.settings: Settings = load_settings(home, database_url)
        # Ingests pin the blobs they publish or reuse, so a concurrent gc leaves them alone (gclock.py).
        self.store = LocalStore(self.settings.home, pins=BlobPins(self.settings))
        # Checked once, on the first session: a lost catalog beside a full store must not be used (gc would
        # delete every blob). `registry fsck` turns this off to inspect and rebuild such a catalog.
        self.check_catalog = True

    @property
    def home(self) -> Path:
        return self.settings.home

    def init(self) -> None:
        """Create the home folders and migrate the database to head."""
        for path in (self.settings.blobs_dir, self.settings.tmp_dir, self.settings.snapshots_dir):
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise DatabaseUnavailable(f"cannot create {path}: {exc.strerror}; check REGISTRY_HOME (or --home) "
                                          "points at a folder this user can write") from None
        get_engine(self.settings)

    def session(self) -> AbstractContextManager[Session]:
        """A short transaction on the catalog; its changes reach the store's artifact records on commit."""
        self.ensure_catalog()
        return self._session()

    def ensure_catalog(self) -> None:
        """Refuse (once per Registry) an empty catalog beside a store that holds data: see fsck.py."""
        if self.check_catalog:
            from .fsck import refuse_lost_catalog

            refuse_lost_catalog(self)
            self.check_catalog = False

    @contextlib.contextmanager
    def _session(self):
        with session_scope(self.settings) as s:
            s.info["store"] = self.store
            yield s

    def read_session(self) -> AbstractContextManager[Session]:
        """A transaction that only reads: on SQLite it takes no write lock, so it never stalls a writer."""
        self.ensure_catalog()
        return session_scope(self.settings, write=False)
