"""`registry repair REF --from DIR`: restore damaged or missing blobs from a local folder holding the same
files, each checked against the manifest's sha256 before it replaces anything (issue 10, item 5)."""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from sqlalchemy import select, update

from conftest import cli_json, run_cli
from registry import Registry, jobs
from registry.importer import import_folder
from registry.models import Artifact, Event
from registry.verify import verify
from registry.workers.runner import worker_loop


@pytest.fixture
def reg(db_url) -> Registry:  # the CLI finds the same catalog: REGISTRY_HOME, and REGISTRY_DATABASE_URL for PG
    r = Registry(database_url=db_url)
    r.init()
    return r


def _folder(path):
    import numpy as np
    from safetensors.numpy import save_file

    path.mkdir()
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / "tokenizer.json").write_text('{"version": "1.0"}')
    save_file({"w": np.arange(16, dtype=np.float32)}, str(path / "model.safetensors"))
    return path


def _blob(reg, name, rel):
    with reg.read_session() as s:
        artifact = s.scalars(select(Artifact).where(Artifact.name == name, Artifact.status != "deleted")).one()
        return reg.store.path(next(f.sha256 for f in artifact.files if f.path == rel))


def _damage(reg, name):
    """config.json's blob gets a flipped byte; tokenizer.json's and model.safetensors' blobs go."""
    blob = _blob(reg, name, "config.json")
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[3] ^= 0xFF
    blob.write_bytes(bytes(data))
    _blob(reg, name, "tokenizer.json").unlink()
    _blob(reg, name, "model.safetensors").unlink()


def _status(reg, name):
    with reg.read_session() as s:
        return s.scalars(select(Artifact.status).where(Artifact.name == name, Artifact.status != "deleted")).one()


def test_repair_from_a_folder_restores_what_matches_and_names_what_does_not(reg, tmp_path):
    source = _folder(tmp_path / "m")
    backup = tmp_path / "backup"
    shutil.copytree(source, backup)
    import_folder(reg, source, "m")
    shutil.rmtree(source)  # the folder it was imported from is gone: a plain repair cannot help
    _damage(reg, "m")
    assert not verify(reg, ["m"])[0].ok
    assert "no longer exists" in run_cli("repair", "m", check=1).stdout

    good_tokenizer = (backup / "tokenizer.json").read_bytes()
    (backup / "tokenizer.json").write_text('{"version": "2.0"}')  # another version of the file
    (backup / "model.safetensors").rename(tmp_path / "model.safetensors")  # and one not there at all
    proc = run_cli("repair", "m", "--from", str(backup), check=1)
    assert "3 of 3 files damaged" in proc.stdout
    assert "restored    config.json (was mismatch)" in proc.stdout
    assert f"CANNOT      tokenizer.json: {backup / 'tokenizer.json'} has other content (sha256 " in proc.stdout
    assert f"CANNOT      model.safetensors: {backup / 'model.safetensors'} is not in the folder" in proc.stdout
    assert f"m is corrupt; {backup} does not hold these files with the content the manifest records" in proc.stdout
    assert proc.stderr.startswith("error: m: cannot restore ")
    assert _status(reg, "m") == "corrupt"

    (backup / "tokenizer.json").write_bytes(good_tokenizer)
    (tmp_path / "model.safetensors").rename(backup / "model.safetensors")
    report = json.loads(run_cli("repair", "m", "--from", str(backup), "--json").stdout)
    assert report["source"] == "given" and report["status"] == "ready" and report["ok"] is True
    assert sorted(report["restored"]) == ["model.safetensors", "tokenizer.json"]
    assert verify(reg, ["m"])[0].ok and _status(reg, "m") == "ready"
    with reg.read_session() as s:
        assert len(s.scalars(select(Event).where(Event.kind == "repaired")).all()) == 1


def test_repair_from_works_for_an_artifact_without_a_source(reg, tmp_path):
    source = _folder(tmp_path / "m")
    import_folder(reg, source, "m")
    with reg.session() as s:  # as a merge or quantize makes it: no folder or hub to go back to
        s.execute(update(Artifact).where(Artifact.name == "m").values(source_path=None))
    _damage(reg, "m")
    # A relative --from, queued for a worker: the job carries the absolute folder.
    queued = cli_json("repair", "m", "--from", "m", "--detach", cwd=tmp_path)
    with reg.read_session() as s:
        assert jobs.get(s, queued["job"]).params["from_dir"] == str(source)
    worker_loop(reg, once=True)
    with reg.read_session() as s:
        job = jobs.get(s, queued["job"])
        assert job.state == "succeeded" and job.result["source"] == "given", job.error
    assert _status(reg, "m") == "ready"
    blob = _blob(reg, "m", "model.safetensors")
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
    # Without --from there was nothing to restore it from.
    _damage(reg, "m")
    with reg.session() as s:
        plain, _ = jobs.enqueue(s, "repair", {"artifact_id": job.params["artifact_id"]})
    worker_loop(reg, once=True)
    with reg.read_session() as s:
        assert "no source to restore it from" in jobs.get(s, plain.id).result["unrestorable"][0]["reason"]


def test_repair_from_refuses_what_is_not_a_folder(home, tmp_path):
    source = _folder(tmp_path / "m")
    r = Registry()
    r.init()
    import_folder(r, source, "m")
    for bad, says in [(tmp_path / "nope", "no such folder"), (source / "config.json", "not a folder")]:
        proc = run_cli("repair", "m", "--from", str(bad), check=2)
        assert proc.stderr.strip() == (f"error: --from {bad}: {says}; give the folder that holds the artifact's "
                                       "files")
