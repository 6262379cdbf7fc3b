"""The Registry handle: settings, store and database sessions in one object."""
from __future__ import annotations

import os
from contextlib import AbstractContextManager
from pathlib import Path

from sqlalchemy.orm import Session

from .config import Settings, load_settings
from .db import get_engine, session_scope
from .store import LocalStore


class Registry:
    """Entry point of the library: `Registry()` uses REGISTRY_HOME and REGISTRY_DATABASE_URL."""

    def __init__(self, home: str | os.PathLike | None = None, database_url: str | None = None):
        self.settings: Settings = load_settings(home, database_url)
        self.store = LocalStore(self.settings.home)

    @property
    def home(self) -> Path:
        return self.settings.home

    def init(self) -> None:
        """Create the home folders and migrate the database to head."""
        for path in (self.settings.blobs_dir, self.settings.tmp_dir, self.settings.snapshots_dir):
            path.mkdir(parents=True, exist_ok=True)
        get_engine(self.settings)

    def session(self) -> AbstractContextManager[Session]:
        """A short transaction on the catalog."""
        return session_scope(self.settings)
