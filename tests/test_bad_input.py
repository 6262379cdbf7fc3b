"""Each bad input: a one-line error naming the problem, its documented exit code, and nothing half-done."""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess

import pytest

from conftest import blob_files, cli_json, run_cli, write_safetensors_header


def _one_line_error(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def _nothing_registered(home) -> None:
    assert cli_json("list") == []
    assert blob_files(home) == []


def _refused_by_import(reg, folder, name: str = "x") -> str:
    """The error of the library call an import job makes: BadInput (exit 2, never retried), one line. Tests
    of many cases of one rule use it, and run one case as the command."""
    from registry.errors import BadInput
    from registry.importer import import_folder

    with pytest.raises(BadInput) as refused:
        import_folder(reg, folder, name)
    err = str(refused.value)
    assert "\n" not in err, err
    return err


def test_missing_folder(home, tmp_path):
    err = _one_line_error(run_cli("import", str(tmp_path / "nope"), "--name", "x", check=2))
    assert "does not exist" in err


def test_empty_folder(home, tmp_path):
    (tmp_path / "empty").mkdir()
    err = _one_line_error(run_cli("import", str(tmp_path / "empty"), "--name", "x", check=2))
    assert "is empty" in err


def test_folder_without_model_files(home, tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "README.md").write_text("hello")
    (folder / "config.json").write_text("{}")
    err = _one_line_error(run_cli("import", str(folder), "--name", "x", check=2))
    assert "no model files" in err
    _nothing_registered(home)


def test_symlink_outside_folder(home, tiny_model, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("do not import me")
    (tiny_model / "notes.txt").symlink_to(secret)
    err = _one_line_error(run_cli("import", str(tiny_model), "--name", "x", check=2))
    assert "notes.txt is a symlink" in err and "outside" in err
    _nothing_registered(home)


def test_symlink_inside_folder_is_followed(home, tiny_model):
    (tiny_model / "tokenizer-copy.json").symlink_to(tiny_model / "tokenizer.json")
    out = cli_json("import", str(tiny_model), "--name", "x")
    assert out["files"] == 6 and len(blob_files(home)) == 5


def test_bad_name_as_a_command(home, tiny_model):
    err = _one_line_error(run_cli("import", str(tiny_model), "--name", "../escape", check=2))
    assert err.startswith("error: invalid name '../escape'")
    _nothing_registered(home)


@pytest.mark.parametrize("name", ["../escape", "a/../b", "..", "has space", "sha256:abcdef12", ""])
def test_bad_names(reg, tiny_model, name):
    assert _refused_by_import(reg, tiny_model, name).startswith(f"invalid name {name!r}")
    _nothing_registered(reg.home)


def test_bad_tag_name(home, tiny_model):
    run_cli("import", str(tiny_model), "--name", "tiny")
    assert "invalid tag" in _one_line_error(run_cli("tag", "tiny", "../x", check=2))


def test_unknown_ref(home):
    err = _one_line_error(run_cli("show", "nothing-here", check=3))
    assert "no artifact, tag or digest named 'nothing-here'" in err
    run_cli("verify", "nothing-here", check=3)
    run_cli("export", "nothing-here", "/tmp/never-made", check=3)
    assert not os.path.exists("/tmp/never-made")
    run_cli("job", "999", check=3)


def test_ambiguous_digest_prefix(home, reg):
    from registry.models import Artifact

    with reg.session() as s:
        for suffix in ("1" * 56, "2" * 56):
            s.add(Artifact(name=f"a{suffix[0]}", kind="base", digest="sha256:abcdef12" + suffix, meta={}))
    err = _one_line_error(run_cli("show", "sha256:abcdef12", check=2))
    assert "matches 2 artifacts" in err
    assert cli_json("show", "sha256:abcdef121")["name"] == "a1"


def test_unknown_kind(home, tiny_model):
    proc = run_cli("import", str(tiny_model), "--name", "x", "--kind", "weird", check=2)
    assert "'weird' is not one of" in proc.stderr
    proc = run_cli("list", "--kind", "weird", check=2)
    from registry.errors import BadInput
    from registry.folder import scan_folder

    with pytest.raises(BadInput, match="unknown kind 'weird'"):
        scan_folder(tiny_model, kind="weird")


def test_locked_database_waits_then_says_so(home, reg, tiny_model):
    conn = sqlite3.connect(home / "registry.db", isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    try:
        proc = run_cli("list", env={"REGISTRY_BUSY_TIMEOUT": "1"}, check=1)
        err = _one_line_error(proc)
        assert "database is locked" in err and "waited 1s" in err
        proc = run_cli("import", str(tiny_model), "--name", "x", env={"REGISTRY_BUSY_TIMEOUT": "1"}, check=1)
        assert "database is locked" in _one_line_error(proc)
    finally:
        conn.execute("ROLLBACK")
        conn.close()
    assert cli_json("list") == []


@pytest.mark.parametrize("case, header, data_len, length, message", [
    ("absurd length", {}, 16, 2 ** 62, "invalid safetensors header (length"),
    ("bad json", None, 16, None, "not valid JSON"),
    ("offsets past end", {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 8, None, "past the end"),
    ("size mismatch", {"w": {"dtype": "F32", "shape": [8], "data_offsets": [0, 16]}}, 16, None, "has 16 bytes"),
])
def test_invalid_safetensors_refused(reg, tiny_model, case, header, data_len, length, message):
    # A refused header as a command: test_string_offsets_refused_once_on_both_databases.
    bad = tiny_model / "model.safetensors"
    if header is None:
        bad.write_bytes(len(b"{not json").to_bytes(8, "little") + b"{not json" + b"\0" * data_len)
    else:
        write_safetensors_header(bad, header, data_len, length)
    err = _refused_by_import(reg, tiny_model)
    assert "model.safetensors" in err and message in err
    _nothing_registered(reg.home)


def test_pickle_weights_recorded_but_flagged_unsafe(home, tiny_model):
    import torch

    torch.save({"w": torch.zeros(4)}, tiny_model / "pytorch_model.bin")
    proc = run_cli("import", str(tiny_model), "--name", "pickled")
    assert "warning: pytorch_model.bin is a pickle file" in proc.stderr
    shown = cli_json("show", "pickled")
    assert shown["metadata"]["unsafe_files"] == ["pytorch_model.bin"]
    assert "pytorch_model.bin" in {f["path"] for f in shown["file_list"]}
    assert "UNSAFE (pickle): pytorch_model.bin" in run_cli("show", "pickled").stdout


def test_name_taken_by_other_content(home, tiny_model, tmp_path):
    run_cli("import", str(tiny_model), "--name", "tiny")
    (tiny_model / "config.json").write_text(json.dumps({"model_type": "llama", "changed": True}))
    err = _one_line_error(run_cli("import", str(tiny_model), "--name", "tiny", check=2))
    assert "already used" in err


def test_rm_refuses_while_derived_then_force(home, tiny_model, tmp_path):
    from test_lineage import make_adapter

    run_cli("import", str(tiny_model), "--name", "tiny")
    run_cli("import", str(make_adapter(tmp_path / "lora", "tiny")), "--name", "lora")
    err = _one_line_error(run_cli("rm", "tiny", check=2))
    assert "derived artifacts (lora)" in err and "--force" in err
    run_cli("rm", "tiny", "--force")
    assert cli_json("show", "lora")["lineage"]["parents"][0]["status"] == "deleted"


def test_disk_full_leaves_no_partial_blob_or_artifact(small_fs, tiny_model, monkeypatch, tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"big": np.ones(1024 * 1024, dtype=np.float32)}, str(tiny_model / "model.safetensors"))  # 4 MiB
    home = small_fs / "home"
    monkeypatch.setenv("REGISTRY_HOME", str(home))
    # The store fills up; the catalog lives on another disk, so the failure itself can be recorded.
    monkeypatch.setenv("REGISTRY_DATABASE_URL", f"sqlite:///{tmp_path / 'catalog.db'}")
    err = _one_line_error(run_cli("import", str(tiny_model), "--name", "big", check=1))
    assert "disk full" in err
    assert cli_json("list") == []
    assert list((home / "tmp").iterdir()) == []
    big_sha = __import__("hashlib").sha256((tiny_model / "model.safetensors").read_bytes()).hexdigest()
    assert all(p.name != big_sha for p in blob_files(home))
    jobs = cli_json("jobs")
    assert jobs[0]["state"] == "failed" and "disk full" in jobs[0]["error"]


# --- safetensors headers: the loader's rules, refused at import as bad input and never retried ---

F32_4 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
LOADER_REJECTS = [  # (case, header or raw header bytes, data bytes, what the error line says)
    ("string offsets", {"w": {**F32_4, "data_offsets": ["0", "16"]}}, 16, "data_offsets [\"0\", \"16\"]"),
    ("three offsets", {"w": {**F32_4, "data_offsets": [0, 8, 16]}}, 16, "two non-negative integers"),
    ("overlapping offsets", {"a": F32_4, "b": {**F32_4, "data_offsets": [8, 24]}}, 24, "overlaps"),
    ("same range twice", {"a": F32_4, "b": F32_4}, 16, "overlaps"),
    ("gap between tensors", {"a": F32_4, "b": {**F32_4, "data_offsets": [32, 48]}}, 48, "leaves a gap"),
    ("data not from offset 0", {"a": {**F32_4, "data_offsets": [16, 32]}}, 32, "leaves a gap"),
    ("end before begin", {"a": {**F32_4, "data_offsets": [16, 0]}}, 16, "ends before it begins"),
    ("trailing data", {"a": F32_4}, 32, "cover 16 of 32 data bytes"),
    ("metadata int value", {"__metadata__": {"format": 1}, "w": F32_4}, 16, "__metadata__ value of 'format'"),
    ("metadata list", {"__metadata__": ["pt"], "w": F32_4}, 16, "__metadata__ is list"),
    ("shape as string", {"w": {**F32_4, "shape": "4"}}, 16, "has shape \"4\""),
    ("shape of floats", {"w": {**F32_4, "shape": [4.0]}}, 16, "has shape [4.0]"),
    ("negative dims", {"w": {**F32_4, "shape": [-2, -2]}}, 16, "has shape [-2, -2]"),
    ("unknown dtype", {"w": {**F32_4, "dtype": "F33"}}, 16, "unknown dtype \"F33\""),
    ("lower-case dtype", {"w": {**F32_4, "dtype": "f32"}}, 16, "unknown dtype \"f32\""),
    ("missing dtype", {"w": {"shape": [4], "data_offsets": [0, 16]}}, 16, "has no dtype"),
    ("tensor not an object", {"w": 5}, 16, "'w' is 5, not an object"),
    ("size overflows 64 bits", {"w": {**F32_4, "shape": [2 ** 62, 2 ** 62]}}, 16, "overflows 64 bits"),
    ("half a byte", {"w": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}, 2, "byte boundary"),
    ("NaN in the header", b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16], "x": NaN}}', 16,
     "not valid JSON"),
    ("UTF-16 header", '{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}'.encode("utf-16"), 16,
     "not UTF-8"),
    ("header too large", None, 0, "length 100000001"),
]
LOADER_ACCEPTS = [  # edge cases the loader takes, which must not be refused either
    ("null metadata", {"__metadata__": None, "w": F32_4}, 16),
    ("extra keys in an entry", {"w": {**F32_4, "extra": [1, 2]}}, 16),
    ("zero-size tensors", {"a": F32_4, "b": {**F32_4, "shape": [0, 3], "data_offsets": [16, 16]}}, 16),
    ("scalar", {"w": {**F32_4, "shape": [], "data_offsets": [0, 4]}}, 4),
    ("F4 pairs", {"w": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}}, 2),
    ("no tensors", {}, 0),
    ("padded header", b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}    ', 16),
]


def _write_header(path, header, data_len) -> None:
    if header is None:  # a length over the loader's 100,000,000-byte limit, in a sparse file that long
        with open(path, "wb") as f:
            f.write((100_000_001).to_bytes(8, "little"))
            f.truncate(8 + 100_000_001 + 16)
    elif isinstance(header, bytes):
        path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * data_len)
    else:
        write_safetensors_header(path, header, data_len)


def _loader_accepts(path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "numpy") as f:
            list(f.keys())
        return True
    except Exception:  # the loader's SafetensorError (and nothing else) for these files
        return False


# Each of the loader's rules through the library call the import job makes (BadInput: exit 2, never retried);
# a refused header as a command (one line, exit 2, one failed attempt) on both backends is the next test.
@pytest.mark.parametrize("case, header, data_len, message", LOADER_REJECTS, ids=[c[0] for c in LOADER_REJECTS])
def test_header_the_loader_rejects_is_refused_once(reg, tiny_model, case, header, data_len, message):
    bad = tiny_model / "model.safetensors"
    _write_header(bad, header, data_len)
    assert not _loader_accepts(bad), "the case must be one the safetensors loader itself rejects"
    err = _refused_by_import(reg, tiny_model)
    assert err.startswith("model.safetensors: invalid safetensors header (") and message in err, err
    _nothing_registered(reg.home)


@pytest.mark.parametrize("case, header, data_len", LOADER_ACCEPTS, ids=[c[0] for c in LOADER_ACCEPTS])
def test_header_the_loader_accepts_is_accepted(tmp_path, case, header, data_len):
    from registry.folder import read_safetensors_header

    path = tmp_path / "ok.safetensors"
    _write_header(path, header, data_len)
    assert _loader_accepts(path)
    read_safetensors_header(path)


def test_string_offsets_refused_once_on_both_databases(db_url, tiny_model):
    write_safetensors_header(tiny_model / "model.safetensors", {"w": {**F32_4, "data_offsets": ["0", "16"]}}, 16)
    err = _one_line_error(run_cli("import", str(tiny_model), "--name", "x", check=2))
    assert "tensor 'w' has data_offsets" in err
    (job,) = cli_json("jobs")
    assert cli_json("job", str(job["id"]))["attempts"] == 1 and job["state"] == "failed"
    assert cli_json("list") == []


# --- the input folder: links and permissions are the user's to fix (exit 2, one line, one attempt) ---

def test_self_referencing_symlink_refused_once(db_url, tiny_model):
    (tiny_model / "loop").symlink_to("loop")
    err = _one_line_error(run_cli("import", str(tiny_model), "--name", "x", check=2))
    assert err == f"error: loop is a symlink loop; remove it from {tiny_model}"
    (job,) = cli_json("jobs")
    assert job["attempts"] == 1 and job["exit_code"] == 2
    assert cli_json("list") == []


def test_broken_symlink_refused(home, tiny_model):
    (tiny_model / "notes.txt").symlink_to(tiny_model / "gone.txt")
    err = _one_line_error(run_cli("import", str(tiny_model), "--name", "x", check=2))
    assert "notes.txt is a broken symlink" in err
    _nothing_registered(home)


def _as_user_without_privileges() -> list[str]:
    """A command prefix that drops root's power to read anything (CAP_DAC_OVERRIDE), as a normal user has none."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--"]


@pytest.mark.parametrize("what", ["file", "folder"])
def test_unreadable_input_refused_once(db_url, tiny_model, what):
    from conftest import REGISTRY_BIN

    target = tiny_model / "tokenizer.json"
    if what == "folder":
        target = tiny_model / "extra"
        target.mkdir()
        (target / "notes.txt").write_text("hidden")
    target.chmod(0)
    try:
        proc = subprocess.run([*_as_user_without_privileges(), REGISTRY_BIN, "import", str(tiny_model), "--name",
                               "x"], capture_output=True, text=True)
    finally:
        target.chmod(0o755)
    assert proc.returncode == 2, proc.stderr
    err = _one_line_error(proc)
    assert f"cannot read {target.name} in {tiny_model}: Permission denied; make it readable" in err
    (job,) = cli_json("jobs")
    assert job["attempts"] == 1 and job["exit_code"] == 2
    assert cli_json("list") == []


def test_control_character_in_a_file_name_refused_by_the_command(home, tiny_model):
    (tiny_model / "notes\n.txt").write_text("x")
    err = _one_line_error(run_cli("import", str(tiny_model), "--name", "x", check=2))
    assert "refusing file name 'notes\\n.txt': it contains a control character" in err
    _nothing_registered(home)


@pytest.mark.parametrize("name", ["notes\n.txt", "ansi\x1b[31m.txt", "tab\there.txt", "bell\x07", "del\x7f",
                                  "line\u2028sep.txt", "sub\ndir/notes.txt"])
def test_control_characters_in_file_names_refused(reg, tiny_model, name):
    (tiny_model / name).parent.mkdir(exist_ok=True)
    (tiny_model / name).write_text("x")
    shown = name.split("/")[0]  # a folder's own name is refused before the files in it
    assert f"refusing file name {shown!r}: it contains a control character" in _refused_by_import(reg, tiny_model)
    _nothing_registered(reg.home)


def test_file_name_that_is_not_utf8_refused(home, tiny_model):
    with open(os.path.join(os.fsencode(tiny_model), b"caf\xe9.txt"), "wb") as f:
        f.write(b"latin-1 name")
    err = _one_line_error(run_cli("import", str(tiny_model), "--name", "x", check=2))
    assert "refusing file name 'caf\\udce9.txt': it contains a byte that is not UTF-8" in err
    _nothing_registered(home)


# --- the CLI itself: usage errors, unexpected errors, --debug, init --home ---

@pytest.mark.parametrize("args, message", [
    (["init", "--bogus"], "error: no such option '--bogus'; see registry init --help"),
    (["list", "--kind", "weird"], "error: invalid value for '--kind': 'weird' is not one of"),
    (["nocmd"], "error: no such command 'nocmd'; see registry --help"),
    (["show"], "error: missing argument 'REF'; see registry show --help"),
])
def test_usage_errors_are_one_line(home, args, message):
    err = _one_line_error(run_cli(*args, check=2))
    assert err.startswith(message), err


def test_unexpected_error_is_one_line_and_debug_shows_the_traceback(db_url, tiny_model, home):
    run_cli("import", str(tiny_model), "--name", "tiny")
    shutil.rmtree(home / "snapshots", ignore_errors=True)
    (home / "snapshots").write_text("a file where the snapshots folder belongs")
    err = _one_line_error(run_cli("path", "tiny", check=1))
    assert err == (f"error: FileExistsError: [Errno 17] File exists: '{home / 'snapshots'}' "
                   "(rerun with --debug for the traceback)")
    proc = run_cli("--debug", "path", "tiny", check=1)
    assert proc.stderr.startswith("Traceback (most recent call last):")
    assert proc.stderr.strip().splitlines()[-1] == f"error: FileExistsError: [Errno 17] File exists: " \
                                                   f"'{home / 'snapshots'}'"
    assert run_cli("path", "tiny", env={"REGISTRY_DEBUG": "1"}, check=1).stderr.startswith("Traceback")


def test_init_home_honours_database_url(db_url, tmp_path, monkeypatch):
    from sqlalchemy import create_engine, inspect

    url = db_url if db_url.startswith("postgresql") else f"sqlite:///{tmp_path / 'elsewhere' / 'catalog.db'}"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.delenv("REGISTRY_DATABASE_URL", raising=False)  # only the flag names the catalog
    new_home = tmp_path / "new-home"
    out = cli_json("--database-url", url, "init", "--home", str(new_home))
    assert out["home"] == str(new_home) and out["database_url"].split("://")[0] == url.split("://")[0]
    assert not (new_home / "registry.db").exists()
    engine = create_engine(url)
    try:
        assert "alembic_version" in inspect(engine).get_table_names()
    finally:
        engine.dispose()
