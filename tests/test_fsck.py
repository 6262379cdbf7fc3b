"""Item 22 (catalog part): every artifact's record is kept in the store; a lost catalog is refused, never taken
for a new one, and `registry fsck --rebuild-catalog` rebuilds it (artifacts, files, tags, lineage) from the store."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from conftest import PG_ADMIN_URL, blob_files, cli_json, import_here, run_cli, tag_here
from test_lineage import make_adapter


def _lose_catalog(db_url: str, home: Path) -> None:
    """What the issue saw: the SQLite file truncated to 0 bytes; on PostgreSQL, the database dropped and made
    again empty."""
    if db_url.startswith("sqlite"):
        os.truncate(home / "registry.db", 0)
        return
    import psycopg
    from sqlalchemy.engine import make_url

    name = make_url(db_url).database
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


def _error(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_lost_catalog_is_refused_then_rebuilt_from_the_store(db_url, tiny_model, tmp_path):
    home = Path(os.environ["REGISTRY_HOME"])
    from registry.db import dispose_all

    import_here(tiny_model, "tiny")
    run_cli("import", str(make_adapter(tmp_path / "lora", "tiny")), "--name", "lora")  # a job: its provenance
    import_here(make_adapter(tmp_path / "gone", "tiny"), "gone")
    tag_here("tiny", "tiny:prod")
    tag_here("lora", "lora:v1")
    tag_here("gone", "gone:v1")
    run_cli("rm", "gone")  # removed before the loss: must not come back
    dispose_all()  # this process's pooled connections must not hold the SQLite file we are about to lose
    before = {a["name"]: a for a in cli_json("list")}
    assert cli_json("fsck")["ok"] is True
    blobs = blob_files(home)

    _lose_catalog(db_url, home)
    for args in (["list"], ["gc"], ["show", "tiny"]):
        err = _error(run_cli(*args, check=1))
        assert "is empty but the store" in err and f"holds {len(blobs)} blobs" in err
        assert "run `registry fsck --rebuild-catalog`, or point REGISTRY_DATABASE_URL at the right database" in err
    assert blob_files(home) == blobs  # gc deleted nothing
    checked = run_cli("fsck", check=1).stdout  # plain fsck on the lost catalog points at the rebuild
    assert "run registry fsck --rebuild-catalog" in checked and "--write-records" not in checked

    out = run_cli("fsck", "--rebuild-catalog").stdout
    assert "rebuilt 2 artifacts, 1 lineage edges and 2 tags" in out
    after = {a["name"]: a for a in cli_json("list")}
    assert sorted(after) == ["lora", "tiny"]
    for name in after:
        for key in ("digest", "kind", "size", "files", "tags", "source"):
            assert after[name][key] == before[name][key], (name, key)
    shown = cli_json("show", "lora")
    assert [(p["name"], p["role"]) for p in shown["lineage"]["parents"]] == [("tiny", "base")]
    assert shown["metadata"]["peft_config"]["r"] == 4 and shown["provenance"]["job_id"]
    assert cli_json("show", "tiny:prod")["name"] == "tiny"
    run_cli("show", "gone:v1", check=3)
    run_cli("verify", "--all")
    assert cli_json("fsck")["ok"] is True
    assert cli_json("gc")["blobs"] == []
    err = _error(run_cli("fsck", "--rebuild-catalog", check=2))
    assert "already holds 2 artifacts" in err


def test_fsck_reports_missing_blobs_and_records(home, tiny_model):
    import_here(tiny_model, "tiny")
    tag_here("tiny", "tiny:prod")
    shutil.rmtree(home / "records")  # a catalog from before records were kept
    proc = run_cli("fsck", check=1)
    assert "NO RECORD       tiny" in proc.stdout and "TAG DIFFERS     tiny:prod" in proc.stdout
    assert "record written  tiny" in run_cli("fsck", "--write-records").stdout
    assert cli_json("fsck")["ok"] is True
    sha = cli_json("show", "tiny")["file_list"][0]["sha256"]
    (home / "blobs" / "sha256" / sha[:2] / sha).unlink()
    report = cli_json("fsck", check=1)
    assert report["ok"] is False and [(m["name"], m["sha256"]) for m in report["missing_blobs"]] == [("tiny", sha)]


def test_rebuilt_artifact_with_a_missing_blob_is_incomplete(home, tiny_model):
    run_cli("import", str(tiny_model), "--name", "tiny")
    sha = cli_json("show", "tiny")["file_list"][0]["sha256"]
    (home / "blobs" / "sha256" / sha[:2] / sha).unlink()
    os.truncate(home / "registry.db", 0)
    proc = run_cli("fsck", "--rebuild-catalog", check=1)
    assert "incomplete: tiny" in proc.stdout
    assert cli_json("show", "tiny")["status"] == "incomplete"
    assert "tiny is incomplete" in run_cli("path", "tiny", check=1).stderr


def test_first_import_is_not_mistaken_for_a_lost_catalog(home, tiny_model):
    # A blob that just arrived may be a first import that has not registered yet: not a reason to refuse.
    home.mkdir(parents=True)
    (home / "blobs" / "sha256" / "ab").mkdir(parents=True)
    young = home / "blobs" / "sha256" / "ab" / ("ab" + "0" * 62)
    young.write_bytes(b"x")
    assert run_cli("list").stdout.startswith("no artifacts")
