"""Where the registry keeps its data: REGISTRY_HOME and REGISTRY_DATABASE_URL."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs


@dataclass(frozen=True)
class Settings:
    """Resolved locations of the home folder and the catalog database."""

    home: Path
    database_url: str
    busy_timeout_ms: int = 30_000

    @property
    def blobs_dir(self) -> Path:
        return self.home / "blobs" / "sha256"

    @property
    def tmp_dir(self) -> Path:
        return self.home / "tmp"

    @property
    def snapshots_dir(self) -> Path:
        return self.home / "snapshots"


def default_home() -> Path:
    """The per-user data folder used when REGISTRY_HOME is not set."""
    return Path(platformdirs.user_data_dir("registry", appauthor=False))


def load_settings(home: str | os.PathLike | None = None, database_url: str | None = None) -> Settings:
    """Settings from arguments, then the environment, then defaults."""
    home_path = Path(home or os.environ.get("REGISTRY_HOME") or default_home()).expanduser().absolute()
    url = database_url or os.environ.get("REGISTRY_DATABASE_URL") or f"sqlite:///{home_path / 'registry.db'}"
    busy_ms = int(float(os.environ.get("REGISTRY_BUSY_TIMEOUT", "30")) * 1000)
    return Settings(home=home_path, database_url=url, busy_timeout_ms=busy_ms)
