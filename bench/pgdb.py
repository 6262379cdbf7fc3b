"""Fresh PostgreSQL databases for the benchmarks that run on both backends (daemon.py, serve.py)."""
from __future__ import annotations

import os
import uuid

PG_ADMIN_URL = os.environ.get("REGISTRY_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")


def pg_database() -> tuple[str, str]:
    """Create a database; returns (its name, the registry's SQLAlchemy URL for it)."""
    import psycopg
    from sqlalchemy.engine import make_url

    name = f"registry_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name, make_url(PG_ADMIN_URL).set(drivername="postgresql+psycopg", database=name).render_as_string(False)


def drop_pg_database(name: str) -> None:
    """Drop it, after closing this process's connections to it."""
    import psycopg

    from registry.db import dispose_all

    dispose_all()
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
