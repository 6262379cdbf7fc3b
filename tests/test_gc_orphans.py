"""Issue 9, item 10: the blobs a failed job stored are freed by the next `registry gc` (its writer has ended),
while a blob whose writer may still be running keeps its pin, or the orphan grace period."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from sqlalchemy import delete

from conftest import _random_safetensors, blob_files, cli_json, import_here, run_cli


def _names(home: Path) -> set[str]:
    return {p.name for p in blob_files(home)}


def test_failed_import_is_freed_at_once_unless_a_running_writer_pins_it(db_url, tiny_model, tmp_path):
    from registry import Registry
    from registry.gc import collect_garbage
    from registry.gclock import release_pins

    home = Path(os.environ["REGISTRY_HOME"])
    import_here(tiny_model, "tiny")
    other = shutil.copytree(tiny_model, tmp_path / "other")
    (other / "generation_config.json").write_text('{"max_length": 7}')
    orphan = hashlib.sha256(b'{"max_length": 7}').hexdigest()
    proc = run_cli("import", str(other), "--name", "tiny", check=2)  # stored, then refused at registration
    assert "name 'tiny' is already used by" in proc.stderr
    assert orphan in _names(home) and len(_names(home)) == 6
    reg = Registry()
    assert reg.store.reuse(orphan) is not None  # another import, still running, uses the same content
    assert collect_garbage(reg).blobs == []  # its pin keeps the blob
    release_pins(reg.store, [orphan])  # that import failed too
    gc = cli_json("gc")
    assert gc["blobs"] == [orphan] and gc["bytes_freed"] == len(b'{"max_length": 7}')
    assert orphan not in _names(home) and len(_names(home)) == 5  # tiny keeps all of its own


def test_failed_pull_is_freed_at_once(db_url, hubp):
    home = Path(os.environ["REGISTRY_HOME"])
    hubp.proxy.faults["model.safetensors"] = "wrong-bytes"
    proc = run_cli("pull", "acme/tiny", check=1)
    assert "model.safetensors: downloaded content does not match the hub" in proc.stderr
    stored = _names(home)
    assert stored  # the other files of the commit
    assert set(cli_json("gc")["blobs"]) == stored  # not after an hour: the job that wrote them has failed
    assert blob_files(home) == []


def test_disk_full_import_then_gc_frees_the_space(db_url, small_fs, tiny_model, monkeypatch):
    home = small_fs / "home"
    monkeypatch.setenv("REGISTRY_HOME", str(home))
    monkeypatch.setenv("REGISTRY_DATABASE_URL", db_url)  # the catalog stays off the small file system
    (tiny_model / "extra.safetensors").write_bytes(_random_safetensors(2, 3))
    proc = run_cli("import", str(tiny_model), "--name", "tiny", check=1)
    assert proc.stderr.strip() == "error: disk full while writing to the store; free space (registry gc) and try again"
    stored = _names(home)
    from registry import Registry, fsck

    monkeypatch.setattr(fsck, "BLOB_EVIDENCE_AGE_SECONDS", -1)  # as if the orphans had lain there for an hour
    fsck.refuse_lost_catalog(Registry())  # the failed job's rows show the catalog is in use, not lost
    assert set(cli_json("gc")["blobs"]) == stored  # what the error told the user to run now frees it
    assert blob_files(home) == [] and cli_json("list") == []


def test_orphan_whose_writer_may_still_run_waits_out_the_grace_period(db_url, tiny_model):
    from registry import Registry
    from registry.gc import collect_garbage
    from registry.models import BlobPin

    reg = Registry()
    reg.init()
    ingested = reg.store.ingest_file(tiny_model / "config.json")  # published by a writer that is still running
    with reg.session() as s:  # whose pin has run out (PIN_TTL): nothing accounts for the blob any more
        s.execute(delete(BlobPin))
    assert cli_json("gc")["blobs"] == []  # younger than the grace period: kept
    assert reg.store.exists(ingested.sha256)
    assert collect_garbage(reg, grace_seconds=0).blobs == [ingested.sha256]
