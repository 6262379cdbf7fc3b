"""Database trouble gives one `error:` line naming the database and what to do, never a traceback (item 22)."""
from __future__ import annotations

import subprocess

import pytest

from conftest import run_cli


def _one_error_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_a_file_that_is_not_a_database(home):
    home.mkdir(parents=True)
    (home / "registry.db").write_bytes(b"these are not the bytes of a SQLite database\n" * 200)
    line = _one_error_line(run_cli("list", check=1))
    assert str(home / "registry.db") in line and "not a SQLite database" in line and "backup" in line


def test_a_damaged_database(home, tiny_model):
    run_cli("import", str(tiny_model), "--name", "tiny")
    db = home / "registry.db"
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 2])  # cut in half: the page count in the header no longer holds
    for suffix in ("-wal", "-shm"):
        (home / f"registry.db{suffix}").unlink(missing_ok=True)
    line = _one_error_line(run_cli("list", check=1))
    assert str(db) in line and "damaged" in line


@pytest.fixture
def read_only_home(tmp_path, monkeypatch):
    """A registry home on a tmpfs that is then remounted read-only (root can write anywhere else)."""
    mount = tmp_path / "ro"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    home = mount / "home"
    monkeypatch.setenv("REGISTRY_HOME", str(home))
    monkeypatch.delenv("REGISTRY_DATABASE_URL", raising=False)
    try:
        yield mount, home
    finally:
        subprocess.run(["umount", "-l", str(mount)])


def test_read_only_home(read_only_home, tiny_model):
    mount, home = read_only_home
    subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
    line = _one_error_line(run_cli("init", check=1))  # a new home cannot be created there
    assert str(home) in line and "REGISTRY_HOME" in line
    subprocess.run(["mount", "-o", "remount,rw", str(mount)], check=True)
    run_cli("import", str(tiny_model), "--name", "tiny")
    subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
    line = _one_error_line(run_cli("tag", "tiny", "tiny:prod", check=1))  # an existing catalog, read-only
    assert str(home / "registry.db") in line and "read-only" in line and "REGISTRY_HOME" in line


def test_unreachable_postgresql(home):
    url = "postgresql+psycopg://alice:s3cret@127.0.0.1:1/registry"
    proc = run_cli("list", env={"REGISTRY_DATABASE_URL": url}, check=1, timeout=60)
    line = _one_error_line(proc)
    assert "127.0.0.1:1/registry" in line and "s3cret" not in line and "refused" in line.lower()
    assert "REGISTRY_DATABASE_URL" in line


@pytest.mark.parametrize("url", ["not a url", "mysqlx://db/registry"])
def test_malformed_database_url_is_bad_input(home, url):
    line = _one_error_line(run_cli("--database-url", url, "list", check=2))
    assert repr(url) in line and "postgresql+psycopg://" in line


def test_disk_io_error(tmp_path, monkeypatch):
    """An ext4 file system on a loop device whose backing file sits on a tiny tmpfs: writes to the catalog
    fail with EIO once the backing store is full, as a dying disk or a full thin volume does."""
    backing = tmp_path / "backing"
    backing.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(backing)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    mount = tmp_path / "disk"
    mount.mkdir()
    loop = None
    try:
        image = backing / "disk.img"
        subprocess.run(["truncate", "-s", "64M", str(image)], check=True)
        if subprocess.run(["mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(image)],
                          capture_output=True).returncode:
            pytest.skip("no mkfs.ext4")
        proc = subprocess.run(["losetup", "-f", "--show", str(image)], capture_output=True, text=True)
        if proc.returncode:
            pytest.skip(f"no loop device: {proc.stderr.strip()}")
        loop = proc.stdout.strip()
        subprocess.run(["mount", "-o", "sync,errors=continue", loop, str(mount)], check=True)
        home = mount / "home"
        monkeypatch.setenv("REGISTRY_HOME", str(home))
        monkeypatch.delenv("REGISTRY_DATABASE_URL", raising=False)
        run_cli("init")
        subprocess.run(["dd", "if=/dev/urandom", f"of={backing / 'fill'}", "bs=1M", "count=16"],
                       capture_output=True)  # fills the tmpfs: the loop device can no longer write
        proc = run_cli("import", str(tmp_path), "--name", "x", check=None)
        line = _one_error_line(proc)
        assert proc.returncode in (1, 2), proc.stderr
        assert "I/O error" in line or "read-only" in line, line
    finally:
        subprocess.run(["umount", "-l", str(mount)])
        if loop:
            subprocess.run(["losetup", "-d", loop])
        subprocess.run(["umount", "-l", str(backing)])
