"""Ctrl-C and unexpected errors in a foreground command: what is left behind, and what the user sees.

Ctrl-C on an import must not leave blob pins that keep gc from freeing what the import stored (its ingest
threads used to run on, and pin, after the job had released its pins); it prints `error: interrupted` and
exits 130. A job that fails with an unexpected error says how to see the traceback.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select, update

from conftest import REGISTRY_BIN, _random_safetensors, blob_files, cli_json, import_here, run_cli


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory) -> Path:
    """4 safetensors files of 40 MiB of random data: an import that takes long enough to interrupt."""
    folder = tmp_path_factory.mktemp("big") / "big2"
    folder.mkdir()
    for i in range(4):
        (folder / f"model-{i + 1:05d}-of-00004.safetensors").write_bytes(_random_safetensors(20 + i, 40))
    (folder / "config.json").write_text('{"model_type": "llama"}')
    return folder


def _interrupted_import(folder: Path, home: Path) -> subprocess.CompletedProcess:
    """`registry import` sent SIGINT (what Ctrl-C sends) while its ingest threads are writing to the store."""
    proc = subprocess.Popen([REGISTRY_BIN, "import", str(folder), "--name", "big2"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120  # generous: a loaded CI machine starts processes slowly
    while not list((home / "tmp").glob("ingest-*")):  # a blob is being written
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _pins() -> list[tuple[str, str]]:
    from registry import Registry
    from registry.models import BlobPin

    with Registry().read_session() as s:
        return [(p.sha256, p.owner) for p in s.scalars(select(BlobPin))]


def test_ctrl_c_on_import_leaves_no_pins_and_gc_frees_what_it_stored(db_url, big_folder):
    home = Path(os.environ["REGISTRY_HOME"])
    _interrupted_import(big_folder, home)
    job = cli_json("job", "1")
    assert (job["state"], job["message"]) == ("cancelled", "interrupted")
    assert _pins() == []  # no ingest thread pinned anything after the job released its pins
    stored = {p.name: p.stat().st_size for p in blob_files(home)}
    gc = cli_json("gc")  # handed to gc as the job ended: freed now, not after 24 h (pins) or 1 h (orphans)
    assert sorted(gc["blobs"]) == sorted(stored) and gc["bytes_freed"] == sum(stored.values())
    assert blob_files(home) == [] and not list((home / "tmp").glob("ingest-*"))
    assert cli_json("list") == []


def test_ctrl_c_prints_one_error_line_and_exits_130(home, big_folder):
    proc = _interrupted_import(big_folder, home)
    assert (proc.returncode, proc.stderr.strip()) == (130, "error: interrupted")
    assert "Traceback" not in proc.stderr and "aborted" not in proc.stderr


def test_gc_frees_at_once_the_pins_of_a_process_gone_from_this_host(db_url, tmp_path):
    """A killed import (kill -9) cannot release its pins; gc sees its process is gone and frees its blobs."""
    from registry import Registry
    from registry.models import BlobPin

    home = Path(os.environ["REGISTRY_HOME"])
    run_cli("init")
    for name, content in (("killed", b"written by a killed process"), ("running", b"written by a live one"),
                          ("remote", b"written on another host")):
        (tmp_path / name).write_bytes(content)
    killed = subprocess.run([sys.executable, "-c", "import os, sys; from registry import Registry; "
                             "print(Registry().store.ingest_file(sys.argv[1]).sha256, flush=True); os._exit(0)",
                             str(tmp_path / "killed")], capture_output=True, text=True, check=True).stdout.strip()
    reg = Registry()
    running = reg.store.ingest_file(tmp_path / "running").sha256  # this test's process: alive
    remote = reg.store.ingest_file(tmp_path / "remote").sha256
    with reg.session() as s:  # pinned by a process on another host: gc cannot tell whether it still runs
        s.execute(update(BlobPin).where(BlobPin.sha256 == remote).values(owner="another-host:1:abcdef123456"))
    assert len(_pins()) == 3
    gc = cli_json("gc")
    assert gc["blobs"] == [killed] and gc["bytes_freed"] == len(b"written by a killed process")
    assert {p.name for p in blob_files(home)} == {running, remote}
    assert sorted(sha for sha, _ in _pins()) == sorted([running, remote])


# On SQLite: the three attempts wait out two backoffs (2 s, 4 s); retrying with backoff on both backends is
# test_jobs.py::test_fail_retries_with_backoff_then_gives_up.
def test_unexpected_error_in_a_foreground_job_says_how_to_see_the_traceback(home, tmp_path):
    folder = tmp_path / "small"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(_random_safetensors(5, 1))
    (folder / "config.json").write_text('{"model_type": "llama"}')
    import_here(folder, "small")
    # A store the registry does not expect: a blob file replaced by a symlink to itself (os.stat: ELOOP).
    blob = next(p for p in blob_files(home) if p.stat().st_size == len('{"model_type": "llama"}'))
    blob.unlink()
    blob.symlink_to(blob.name)
    proc = run_cli("verify", "small", check=1)
    assert proc.stderr.strip() == (f"error: OSError: [Errno 40] Too many levels of symbolic links: '{blob}' "
                                   "(rerun with --debug for the traceback)")
    job = cli_json("jobs")[0]
    assert (job["state"], job["attempts"]) == ("failed", 3)  # unexpected: retried, as the README says
    deliberate = run_cli("verify", "no-such-artifact", check=3)  # a deliberate error stays one plain line
    assert "rerun with --debug" not in deliberate.stderr


def test_a_pid_is_judged_dead_only_in_this_hosts_process_table():
    """A container with host networking shares the hostname but not the pids, and two machines may share a
    hostname: a pid absent here says nothing about their processes, whose leases and pins must stand."""
    import socket
    import subprocess
    import sys

    from registry.jobs import owner_is_dead, this_host

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert owner_is_dead(f"{this_host()}:{gone.pid}:abc123")
    assert not owner_is_dead(f"{this_host()}:{os.getpid()}:abc123")
    assert not owner_is_dead(f"{socket.gethostname()}:{gone.pid}:abc123")  # same name, another process table
    assert not owner_is_dead(f"{socket.gethostname()}~00000000.1:{gone.pid}:abc123")
