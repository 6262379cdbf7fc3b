"""gc beside running imports and pulls (both databases), temp files and partials, permissions, export checks."""
from __future__ import annotations

import fcntl
import os
import shutil
import stat
import subprocess
import sys
import time
from datetime import timedelta

import pytest
from sqlalchemy import text, update

from conftest import REGISTRY_BIN, blob_files, cli_json, import_here, run_cli

IMPORT_LOOP = r"""
import sys, time
from registry import Registry
from registry.catalog import remove_artifact, resolve
from registry.importer import import_folder

reg = Registry()
folder, count, deadline = sys.argv[1], int(sys.argv[2]), time.time() + float(sys.argv[3])
ok = failed = 0
for i in range(count):
    if time.time() > deadline:
        break
    try:
        result = import_folder(reg, folder, f"imp{i}")
    except Exception as exc:
        failed += 1
        print(f"import {i} failed: {exc!r}", file=sys.stderr)
        continue
    with reg.session() as s:
        missing = [f.path for f in resolve(s, f"imp{i}").files if not reg.store.exists(f.sha256)]
    if missing:
        print(f"import {i} registered with missing blobs: {missing}", file=sys.stderr)
        sys.exit(3)
    ok += 1
    if i < count - 1 and time.time() < deadline:  # its blobs become unreferenced, and the next import reuses them
        with reg.session() as s:
            remove_artifact(s, f"imp{i}")
print(ok, failed)
"""

GC_LOOP = r"""
import pathlib, sys
from registry import Registry
from registry.gc import collect_garbage

reg = Registry()
stop, runs, removed = pathlib.Path(sys.argv[1]), 0, 0
while not stop.exists():
    removed += len(collect_garbage(reg, grace_seconds=0, all_temp=True).blobs)
    runs += 1
print(runs, removed)
"""


def _start_gc_loop(tmp_path):
    stop = tmp_path / "stop-gc"
    return stop, subprocess.Popen([sys.executable, "-c", GC_LOOP, str(stop)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)


def _stop_gc_loop(stop, proc) -> tuple[int, int]:
    stop.touch()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"gc failed beside the imports:\n{err}"
    runs, removed = map(int, out.split())
    return runs, removed


def test_gc_in_a_tight_loop_beside_imports_loses_nothing(db_url, tiny_model, tmp_path):
    import_here(tiny_model, "first")  # the catalog is in use before gc starts
    run_cli("rm", "first")
    stop, gc = _start_gc_loop(tmp_path)
    try:
        imports = subprocess.run([sys.executable, "-c", IMPORT_LOOP, str(tiny_model), "40", "30"],
                                 capture_output=True, text=True, timeout=300)
    finally:
        runs, removed = _stop_gc_loop(stop, gc)
    assert imports.returncode == 0, imports.stderr
    ok, failed = map(int, imports.stdout.split())
    assert failed == 0, imports.stderr  # no "blob vanished; retry" reached the user either
    assert ok >= 10 and runs >= 10, (ok, runs)
    assert removed > 0  # gc really did remove the blobs of removed artifacts while imports reused them
    assert len(cli_json("list")) == 1
    run_cli("verify", "--all")


def test_gc_in_a_tight_loop_beside_pulls_loses_nothing(db_url, hubp, tmp_path):
    stop, gc = _start_gc_loop(tmp_path)
    try:
        pulled = []
        for i in range(6):
            out = cli_json("pull", "acme/tiny", "--name", f"pulled{i}")
            pulled.append(out["name"])
            if i % 2:
                run_cli("rm", f"pulled{i}")
    finally:
        runs, _ = _stop_gc_loop(stop, gc)
    assert runs >= 3
    assert len(cli_json("list")) == 3
    run_cli("verify", "--all")


def test_pinned_blob_survives_gc_and_registration_refuses_a_missing_one(db_url, tiny_model):
    from registry import Registry
    from registry.catalog import register_artifact
    from registry.gc import collect_garbage
    from registry.gclock import BlobVanished
    from registry.models import Artifact, BlobPin

    reg = Registry()
    reg.init()
    ingested = reg.store.ingest_file(tiny_model / "config.json")  # published and pinned, not registered
    collect_garbage(reg, grace_seconds=0)
    assert reg.store.exists(ingested.sha256)  # pinned: an orphan gc would otherwise remove at once
    with reg.session() as s:  # as if the importing job had crashed a day ago
        s.execute(update(BlobPin).values(expires_at=BlobPin.expires_at - timedelta(days=2)))
    assert collect_garbage(reg, grace_seconds=0).blobs == [ingested.sha256]
    assert not reg.store.exists(ingested.sha256)
    with pytest.raises(BlobVanished):
        with reg.session() as s:
            register_artifact(s, reg.store, name="ghost", kind="checkpoint", files={"config.json": ingested},
                              meta={})
    with reg.session() as s:
        assert s.query(Artifact).count() == 0 and s.query(BlobPin).count() == 0  # expired pins are dropped


def test_pins_end_with_the_import_so_gc_frees_a_removed_artifact(db_url, home, tiny_model):
    run_cli("import", str(tiny_model), "--name", "tiny")
    run_cli("import", str(tiny_model), "--name", "tiny")  # a no-op registration releases its pins too
    run_cli("rm", "tiny")
    assert len(cli_json("gc")["blobs"]) == 5
    assert blob_files(home) == []


def test_store_entries_gc_keeps_and_removes(home, tiny_model):
    from registry import Registry

    import_here(tiny_model, "tiny")
    reg = Registry()
    tmp = home / "tmp"
    old = time.time() - 3600

    def make(name: str, size: int = 10, age: float = 3600) -> None:
        (tmp / name).write_bytes(b"x" * size)
        os.utime(tmp / name, (time.time() - age,) * 2)

    make("ingest-fresh", age=0)  # e.g. created by mkstemp and not locked yet: never taken
    make("ingest-crashed")
    make("ingest-held")
    make("pull-abc.part", 100, age=3600)  # a killed pull an hour ago: kept for resuming
    make("pull-old.part", 100, age=25 * 3600)  # past the 24 h window
    killed = tmp / "quantize-killed"
    (killed / "out").mkdir(parents=True)
    (killed / "out" / "model.safetensors").write_bytes(b"w" * 1000)
    (killed / ".lock").touch()
    os.utime(killed, (old, old))
    with open(tmp / "ingest-held", "rb") as held, reg.store.scratch_dir("quantize") as running:
        fcntl.flock(held, fcntl.LOCK_EX)
        os.utime(running, (old, old))
        report = cli_json("gc")
        assert sorted(report["temp_files"]) == ["ingest-crashed", "pull-old.part", "quantize-killed"]
        assert report["partials_kept"] == ["pull-abc.part"]
        assert "gc --all-temp" in run_cli("gc").stdout
        assert running.is_dir() and (tmp / "ingest-held").exists() and (tmp / "ingest-fresh").exists()
        assert cli_json("gc", "--all-temp")["temp_files"] == ["pull-abc.part"]
        make("pull-short.part", 100, age=600)
        assert cli_json("gc", env={"REGISTRY_PARTIAL_TTL": "300"})["temp_files"] == ["pull-short.part"]
        proc = run_cli("gc", env={"REGISTRY_PARTIAL_TTL": "soon"}, check=2)
        assert proc.stderr.startswith("error: REGISTRY_PARTIAL_TTL") and len(proc.stderr.splitlines()) == 1
    assert not running.exists()  # the scratch folder goes with its user
    assert sorted(p.name for p in tmp.iterdir()) == ["ingest-fresh", "ingest-held"]
    run_cli("verify", "tiny")


CHURN = r"""
import io, os, sys, time
from concurrent.futures import ThreadPoolExecutor
from registry import Registry

reg = Registry()
deadline = time.time() + float(sys.argv[1])

def churn(seed):
    n = 0
    while time.time() < deadline:
        data = os.urandom(4096 + seed)
        got = reg.store.ingest_stream(io.BytesIO(data))
        assert reg.store.exists(got.sha256), got
        with reg.store.scratch_dir("work") as d:
            (d / "f").write_bytes(data)
            assert (d / "f").read_bytes() == data
        n += 1
    return n

with ThreadPoolExecutor(4) as pool:
    print(sum(pool.map(churn, range(4))))
"""


def test_temp_files_of_running_ingests_survive_a_gc_loop(home, tiny_model, tmp_path):
    run_cli("import", str(tiny_model), "--name", "tiny")
    stop, gc = _start_gc_loop(tmp_path)
    try:
        # 5 s: some 500 ingests and scratch folders beside some 250 gc runs on 2 idle cores (it was 15 s).
        churn = subprocess.run([sys.executable, "-c", CHURN, "5"], capture_output=True, text=True, timeout=120)
    finally:
        runs, _ = _stop_gc_loop(stop, gc)  # never crashed (e.g. FileNotFoundError on a vanished temp file)
    assert churn.returncode == 0, churn.stderr
    assert int(churn.stdout) > 20 and runs > 5


def test_disk_full_pull_names_its_partials(hubp, small_fs, monkeypatch, tmp_path):
    home = small_fs / "home"
    monkeypatch.setenv("REGISTRY_HOME", str(home))
    monkeypatch.setenv("REGISTRY_DATABASE_URL", f"sqlite:///{tmp_path / 'catalog.db'}")
    proc = run_cli("pull", "acme/big", check=1)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"disk full while downloading model.safetensors into {home / 'tmp'} (partial downloads there: " in lines[0]
    assert "free space and run the pull again to resume" in lines[0]
    assert list((home / "tmp").glob("pull-*.part"))
    assert cli_json("gc")["partials_kept"]  # kept for the resume


def _umask(mask: int):
    return {"preexec_fn": lambda: os.umask(mask)}


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_store_and_export_modes_follow_the_umask(home, tiny_model, tmp_path):
    run_cli("import", str(tiny_model), "--name", "tiny", **_umask(0o027))
    assert {_mode(p) for p in blob_files(home)} == {0o440}
    linked, copied = tmp_path / "linked", tmp_path / "copied"
    run_cli("export", "tiny", str(linked), **_umask(0o027))
    run_cli("export", "tiny", str(copied), "--copy", **_umask(0o027))
    assert _mode(linked) == _mode(copied) == 0o750
    assert _mode(linked / "config.json") == 0o440  # the store's blob (hardlink; a reflink would be 0o640)
    assert _mode(copied / "config.json") == 0o640 and os.stat(copied / "config.json").st_nlink == 1
    snapshot = run_cli("path", "tiny", **_umask(0o027)).stdout.strip()
    assert _mode(snapshot) == 0o550 and _mode(os.path.join(snapshot, "config.json")) == 0o440


def test_configured_file_mode_for_a_group_shared_store(home, tiny_model):
    run_cli("import", str(tiny_model), "--name", "tiny", env={"REGISTRY_FILE_MODE": "0440"})
    assert {_mode(p) for p in blob_files(home)} == {0o440}
    run_cli("path", "tiny")  # a snapshot hardlinks the blobs and must not widen their mode
    assert {_mode(p) for p in blob_files(home)} == {0o440}
    proc = run_cli("import", str(tiny_model), "--name", "t2", env={"REGISTRY_FILE_MODE": "0666"}, check=2)
    assert "REGISTRY_FILE_MODE" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_export_rechecks_paths_from_the_catalog(db_url, tiny_model, tmp_path):
    from registry.db import get_engine
    from registry.config import load_settings

    import_here(tiny_model, "tiny")
    with get_engine(load_settings()).begin() as conn:  # a tampered (or foreign) catalog
        conn.execute(text("UPDATE files SET path = '../escaped.json' WHERE path = 'config.json'"))
    dest = tmp_path / "out" / "model"
    proc = run_cli("export", "tiny", str(dest), check=1)
    assert "unsafe file name '../escaped.json'" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "escaped.json").exists() and not dest.exists()


def test_materialize_reflink_else_link_else_copy(reg, tiny_model, tmp_path):
    got = reg.store.ingest_file(tiny_model / "config.json")
    how = reg.store.materialize(got.sha256, tmp_path / "auto.json")
    assert how in ("reflink", "hardlink")
    shared = os.stat(tmp_path / "auto.json").st_ino == os.stat(reg.store.path(got.sha256)).st_ino
    assert shared == (how == "hardlink")
    how = reg.store.materialize(got.sha256, tmp_path / "copy.json", "copy")
    assert how in ("reflink", "copy")
    (tmp_path / "copy.json").write_text("{}")  # independent and writable
    assert reg.store.size(got.sha256) == got.size


def _fsynced_paths(trace: str) -> list[str]:
    """Paths fsynced in an `strace -f -y -e trace=fsync` log (-y prints each fd's path)."""
    import re

    return re.findall(r"fsync\(\d+<([^>]+)>", trace)


@pytest.mark.skipif(not shutil.which("strace"), reason="needs strace")
def test_new_blob_folders_and_linked_data_are_fsynced(home, tiny_model, tmp_path):
    trace = tmp_path / "trace"
    proc = subprocess.run(["strace", "-f", "-qq", "-y", "-e", "trace=fsync", "-o", str(trace), REGISTRY_BIN,
                           "import", str(tiny_model), "--name", "tiny", "--link"], capture_output=True, text=True)
    if proc.returncode != 0 and "ptrace" in proc.stderr:
        pytest.skip(f"strace cannot trace here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    synced = _fsynced_paths(trace.read_text())
    blobs = blob_files(home)
    assert len(blobs) == 5
    for blob in blobs:
        assert str(blob.parent) in synced  # the new name inside blobs/sha256/xx
    assert str(home / "blobs" / "sha256") in synced  # the new xx folders themselves
    # the temporary name's removal (with --link, the name is in a locked scratch folder under tmp/)
    assert any(path == str(home / "tmp") or path.startswith(str(home / "tmp") + "/") for path in synced)
    for source in ("model.safetensors", "config.json"):
        assert str(tiny_model / source) in synced  # --link: the data the store now shares, before publishing
