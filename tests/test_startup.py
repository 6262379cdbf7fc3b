"""Start-up (issue 9 item 2): `--help` imports no ORM, and list/show/verify --quick read a SQLite catalog at the
newest schema without SQLAlchemy or Alembic (registry/fastread.py), printing what the ORM path prints.

These are behaviour tests (which modules a command imports, what it prints), not timings: bench/startup.py
measures the time.
"""
from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import blob_files, cli_json, run_cli, write_safetensors_header

HEAVY = ("sqlalchemy", "alembic", "httpx", "huggingface_hub", "rich", "torch", "transformers", "psycopg")
# The console script's code, plus a note of every module imported by the time the process exits.
RUNNER = ("import atexit, os, sys\n"
          "atexit.register(lambda: open(os.environ['MODULES_OUT'], 'w').write('\\n'.join(sorted(sys.modules))))\n"
          "from registry.cli import main\n"
          "sys.argv[0] = 'registry'\n"
          "sys.exit(main())\n")
ORM_PATH = {"REGISTRY_FAST_READ": "0"}  # the same command through SQLAlchemy


def imported(tmp_path: Path, *args: str, check: int = 0) -> tuple[set[str], subprocess.CompletedProcess]:
    """Run `registry ARGS` and return the top-level packages it imported, and the finished process."""
    out = tmp_path / "modules.txt"
    proc = subprocess.run([sys.executable, "-c", RUNNER, *args], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "MODULES_OUT": str(out)})
    assert proc.returncode == check, proc.stderr
    return {m.split(".")[0] for m in out.read_text().split()}, proc


def _model(folder: Path, size: int, adapter_of: str | None = None) -> Path:
    """A small model folder (no torch needed); `size` makes its weights distinct."""
    folder.mkdir(parents=True)
    if adapter_of:
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                                "base_model_name_or_path": adapter_of}))
    else:
        (folder / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "float32",
                                                        "architectures": ["LlamaForCausalLM"]}))
        (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "size": size}))
    weights = folder / ("adapter_model.safetensors" if adapter_of else "model.safetensors")
    header = {"w": {"dtype": "F32", "shape": [size], "data_offsets": [0, 4 * size]}}
    write_safetensors_header(weights, header, 4 * size)
    return folder


@pytest.fixture
def catalog(home, tmp_path) -> Path:
    """tiny (tagged tiny:prod), twin (the same files), lora (an adapter of tiny), other (removed); built in this
    process (several CLI runs would cost seconds), then read by the CLI."""
    from registry import Registry
    from registry import catalog as cat
    from registry.importer import import_folder

    reg = Registry()
    tiny = _model(tmp_path / "m" / "tiny", 4)
    import_folder(reg, tiny, "tiny")
    import_folder(reg, tiny, "twin")
    import_folder(reg, _model(tmp_path / "m" / "lora", 2, adapter_of="tiny"), "lora", base="tiny")
    import_folder(reg, _model(tmp_path / "m" / "other", 8), "other")
    with reg.session() as s:
        cat.set_tag(s, "tiny", "tiny:prod")
    with reg.session() as s:
        cat.remove_artifact(s, "other")
    return home


def test_help_imports_no_orm_and_no_network_library(home, tmp_path):
    modules, proc = imported(tmp_path, "--help")
    assert "Commands:" in proc.stdout
    assert modules.isdisjoint(HEAVY), sorted(modules & set(HEAVY))
    modules, proc = imported(tmp_path, "verify", "--help")  # a command's help makes no Registry either
    assert "--quick" in proc.stdout and modules.isdisjoint(HEAVY), sorted(modules & set(HEAVY))


def test_read_commands_on_a_sqlite_catalog_import_no_orm(catalog, tmp_path):
    for args in (["list"], ["show", "tiny:prod", "--json"], ["verify", "--quick", "tiny"],
                 ["verify", "--quick", "--all", "--json"]):
        modules, proc = imported(tmp_path, *args)
        assert proc.stdout and modules.isdisjoint(HEAVY), (args, sorted(modules & set(HEAVY)))
    # What Registry() checks for every command still fails the fast ones.
    proc = run_cli("list", env={"REGISTRY_FILE_MODE": "0666"}, check=2)
    assert proc.stderr.startswith("error: REGISTRY_FILE_MODE='0666'")


@pytest.mark.parametrize("home", ["postgresql"], indirect=True)  # SQLite: the test above
def test_postgresql_keeps_the_orm_path(catalog, tmp_path):
    modules, proc = imported(tmp_path, "list")
    assert "sqlalchemy" in modules and proc.stdout == run_cli("list", env=ORM_PATH).stdout
    assert json.loads(imported(tmp_path, "verify", "--quick", "tiny", "--json")[1].stdout)["ok"] is True


def _same(args: list[str], check: int = 0) -> subprocess.CompletedProcess:
    fast = run_cli(*args, check=check)
    full = run_cli(*args, env=ORM_PATH, check=check)
    assert (fast.stdout, fast.stderr) == (full.stdout, full.stderr), args
    return fast


def test_fast_and_orm_paths_print_the_same(catalog):
    listed = {a["name"]: a for a in json.loads(_same(["list", "--deleted", "--json"]).stdout)}
    tiny = json.loads(_same(["show", "tiny:prod", "--json"]).stdout)
    for args in (["list"], ["list", "--kind", "adapter"], ["show", "tiny"], ["show", "lora", "--json"],
                 ["show", listed["lora"]["digest"][:15]]):
        assert _same(args).stdout
    # The same one-line errors and exit codes.
    assert "error: no artifact, tag or digest named 'nothing'" in _same(["show", "nothing"], check=3).stderr
    assert "matches 2 artifacts (tiny, twin)" in _same(["show", tiny["digest"][:20]], check=2).stderr

    def verify_same(args: list[str], check: int = 0) -> dict:
        fast = run_cli(*args, "--json", check=check)
        full = run_cli(*args, "--json", env=ORM_PATH, check=check)
        fast_out, full_out = json.loads(fast.stdout), json.loads(full.stdout)
        assert full_out.pop("job") == fast_out.pop("job") + 1  # each run records its job
        assert fast_out == full_out and fast.stderr == full.stderr
        # ... the same job row and the same events ...
        last = cli_json("jobs", "--limit", "2")
        for j in last:
            # (progress too: a heartbeat records it when a loaded machine makes the ORM run last over a second)
            for key in ("id", "created_at", "started_at", "finished_at", "heartbeat_at", "progress"):
                j.pop(key)
        assert last[0] == last[1]
        events = cli_json("show", "tiny")["events"]
        assert [(e["kind"], e["detail"]) for e in events[-2:]] == [(events[-1]["kind"], events[-1]["detail"])] * 2
        return fast_out

    assert verify_same(["verify", "--quick", "--all"])["ok"] is True
    assert "tiny sha256:" in _same(["verify", "--quick", "tiny", "lora"]).stdout
    # A touched blob: CHANGED, exit 1, a failed job and a verify_failed event, nothing marked corrupt.
    blob = next(p for p in blob_files(catalog) if p.name == tiny["file_list"][0]["sha256"])
    os.utime(blob, ns=(blob.stat().st_atime_ns, blob.stat().st_mtime_ns + 10**9))
    assert verify_same(["verify", "--quick", "tiny:prod"], check=1)["ok"] is False
    assert "CHANGED" in _same(["verify", "--quick", "tiny"], check=1).stdout
    assert cli_json("jobs", "--limit", "1")[0]["state"] == "failed" and cli_json("show", "tiny")["status"] == "ready"
    # A missing blob is definite damage: the fast path leaves marking artifacts corrupt to the ORM path.
    blob.unlink()
    out = run_cli("verify", "--quick", "tiny", check=1).stdout
    assert "MISSING" in out and "also marked corrupt (they share the damaged files): twin" in out
    assert cli_json("show", "twin")["status"] == "corrupt"


def test_a_catalog_not_at_the_newest_schema_is_migrated_first(catalog, tmp_path):
    from alembic import command
    from sqlalchemy import create_engine

    from registry.db import alembic_config
    from registry.schema import SCHEMA_HEAD

    before = cli_json("list")
    db = catalog / "registry.db"
    engine = create_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), "0003")
    engine.dispose()
    version = lambda: sqlite3.connect(db).execute("SELECT version_num FROM alembic_version").fetchone()[0]  # noqa: E731
    assert version() == "0003"
    modules, proc = imported(tmp_path, "list", "--json")
    assert "alembic" in modules  # it took the full path, which migrates
    # ... keeping every file, tag and lineage edge: with foreign keys on, 0004's rebuild of `artifacts` used to
    # cascade-delete them.
    assert version() == SCHEMA_HEAD and json.loads(proc.stdout) == before
    assert cli_json("show", "lora")["lineage"]["parents"][0]["name"] == "tiny"
    modules, proc = imported(tmp_path, "show", "tiny:prod")  # at the head again: the fast path
    assert "sqlalchemy" not in modules and re.search(r"^tiny  \(base, ready\)", proc.stdout)


def test_no_database_yet_takes_the_full_path_which_creates_it(home, tmp_path):
    modules, proc = imported(tmp_path, "list")
    assert proc.stdout.startswith("no artifacts") and "alembic" in modules and (home / "registry.db").exists()
