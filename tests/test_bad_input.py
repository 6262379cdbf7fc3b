"""Each bad input: a one-line error naming the problem, its documented exit code, and nothing half-done."""
from __future__ import annotations

import json
import os
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


@pytest.mark.parametrize("name", ["../escape", "a/../b", "..", "has space", "sha256:abcdef12", ""])
def test_bad_names(home, tiny_model, name):
    err = _one_line_error(run_cli("import", str(tiny_model), "--name", name, check=2))
    assert "invalid name" in err or "usage" in err
    _nothing_registered(home)


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
def test_invalid_safetensors_refused(home, tiny_model, case, header, data_len, length, message):
    bad = tiny_model / "model.safetensors"
    if header is None:
        bad.write_bytes(len(b"{not json").to_bytes(8, "little") + b"{not json" + b"\0" * data_len)
    else:
        write_safetensors_header(bad, header, data_len, length)
    err = _one_line_error(run_cli("import", str(tiny_model), "--name", "x", check=2))
    assert "model.safetensors" in err and message in err
    _nothing_registered(home)


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
