"""The schema comes only from Alembic; every command documents itself."""
from __future__ import annotations

import pytest
from sqlalchemy import create_engine, inspect

from conftest import run_cli
from registry.db import alembic_config, current_revision, head_revision, migrate
from registry.models import Base


def _diff(engine) -> list:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn), Base.metadata)


def test_empty_database_migrates_to_head_without_autogenerate_diff(db_url):
    engine = create_engine(db_url)
    assert current_revision(engine) is None
    migrate(engine)
    assert current_revision(engine) == head_revision()
    assert set(inspect(engine).get_table_names()) >= {"artifacts", "files", "blobs", "edges", "tags", "jobs",
                                                      "events", "alembic_version"}
    assert _diff(engine) == []
    engine.dispose()


def test_downgrade_to_base_and_up_again(db_url):
    from alembic import command

    engine = create_engine(db_url)
    migrate(engine)
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), "base")
    assert inspect(engine).get_table_names() in ([], ["alembic_version"])
    migrate(engine)
    assert _diff(engine) == []
    engine.dispose()


def test_schema_head_constant_matches_alembic():
    from registry.db import SCHEMA_HEAD

    assert SCHEMA_HEAD == head_revision()


def test_first_use_migrates_automatically(home):
    assert not (home / "registry.db").exists()
    assert run_cli("list").stdout.startswith("no artifacts")
    assert current_revision(create_engine(f"sqlite:///{home / 'registry.db'}")) == head_revision()


def test_sqlite_runs_with_wal_and_foreign_keys(reg):
    from sqlalchemy import text

    with reg.session() as s:
        assert s.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert s.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert s.execute(text("PRAGMA busy_timeout")).scalar() == 30000


def test_init_reports_home(tmp_path, home):
    out = run_cli("init", "--home", str(tmp_path / "elsewhere")).stdout
    assert str(tmp_path / "elsewhere") in out and (tmp_path / "elsewhere" / "blobs" / "sha256").is_dir()


COMMANDS = ["init", "import", "pull", "merge", "quantize", "convert", "generate", "list", "show", "verify", "manifest",
            "export", "path", "tag", "rm", "gc", "jobs", "job", "cancel", "worker", "fsck", "repair", "link", "daemon",
            "serve", "token"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    from registry.cli import cli

    assert set(COMMANDS) == set(cli.commands)
    proc = run_cli(command, "--help")
    assert proc.stdout.startswith(f"Usage: registry {command}")
    body = proc.stdout.split("\n\n", 2)[1].strip()
    assert len(body) > 20  # a real description, not an empty docstring


def test_read_commands_offer_json():
    from registry.cli import cli

    for name in ("list", "show", "verify", "jobs", "job", "gc", "import", "init", "pull", "merge", "quantize", "convert"):
        assert any(p.name == "as_json" for p in cli.commands[name].params), name
