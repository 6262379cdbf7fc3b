"""The main path through the CLI: import, list, show, verify, export, tag, rm, gc.

A test of another command registers its model by a library call (import_here): `registry import` is tested
here, in test_lineage and test_bad_input."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess

import pytest

from conftest import blob_files, cli_json, import_here, run_cli


def test_import_list_show_verify(home, tiny_model):
    out = run_cli("import", str(tiny_model), "--name", "tiny").stdout
    assert "registered tiny (base) sha256:" in out
    items = cli_json("list")
    assert [(a["name"], a["kind"], a["status"], a["files"]) for a in items] == [("tiny", "base", "ready", 5)]
    shown = cli_json("show", "tiny")
    assert shown["metadata"]["model_type"] == "llama"
    assert shown["metadata"]["architectures"] == ["LlamaForCausalLM"]
    assert shown["metadata"]["dtype"] == "float32"
    assert shown["metadata"]["parameter_count"] > 100_000
    assert {f["path"] for f in shown["file_list"]} >= {"config.json", "model.safetensors", "tokenizer.json"}
    expected = hashlib.sha256((tiny_model / "model.safetensors").read_bytes()).hexdigest()
    assert {f["path"]: f["sha256"] for f in shown["file_list"]}["model.safetensors"] == expected
    assert [e["kind"] for e in shown["events"]] == ["registered"]
    assert shown["jobs"][0]["type"] == "import" and shown["jobs"][0]["state"] == "succeeded"
    text = run_cli("show", "tiny").stdout
    assert "model.safetensors" in text and "llama" in text
    verify = run_cli("verify", "tiny").stdout
    assert "tiny sha256:" in verify and ": ok" in verify
    assert "ok          model.safetensors" in verify
    assert cli_json("show", "tiny")["events"][-1]["kind"] == "verified_ok"


def test_list_filters_by_kind_and_human_output(home, tiny_model):
    import_here(tiny_model, "tiny")
    assert cli_json("list", "--kind", "adapter") == []
    assert "tiny" in run_cli("list").stdout
    assert "no artifacts" in run_cli("list", "--kind", "merged").stdout


def test_flipped_byte_fails_verify_and_marks_corrupt(home, tiny_model):
    import_here(tiny_model, "tiny")
    sha = {f["path"]: f["sha256"] for f in cli_json("show", "tiny")["file_list"]}["model.safetensors"]
    blob = home / "blobs" / "sha256" / sha[:2] / sha
    os.chmod(blob, 0o644)
    with open(blob, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    proc = run_cli("verify", "tiny", check=1)
    assert "MISMATCH    model.safetensors" in proc.stdout
    assert f"expected {sha}" in proc.stdout
    assert "ok          config.json" in proc.stdout
    assert cli_json("show", "tiny")["status"] == "corrupt"
    report = json.loads(run_cli("verify", "tiny", "--json", check=1).stdout)
    bad = [f for f in report["artifacts"][0]["files"] if f["status"] != "ok"]
    assert [(f["path"], f["status"], f["expected"]) for f in bad] == [("model.safetensors", "mismatch", sha)]
    assert bad[0]["actual"] == hashlib.sha256(blob.read_bytes()).hexdigest()


def test_deleted_blob_is_missing(home, tiny_model):
    import_here(tiny_model, "tiny")
    sha = {f["path"]: f["sha256"] for f in cli_json("show", "tiny")["file_list"]}["tokenizer.json"]
    (home / "blobs" / "sha256" / sha[:2] / sha).unlink()
    proc = run_cli("verify", "tiny", check=1)
    assert "MISSING     tokenizer.json" in proc.stdout
    quick = run_cli("verify", "--quick", "tiny", check=1)
    assert "MISSING     tokenizer.json" in quick.stdout
    assert cli_json("show", "tiny")["status"] == "corrupt"


def test_repaired_artifact_becomes_ready_again(home, tiny_model):
    import_here(tiny_model, "tiny")
    sha = {f["path"]: f["sha256"] for f in cli_json("show", "tiny")["file_list"]}["config.json"]
    blob = home / "blobs" / "sha256" / sha[:2] / sha
    saved = blob.read_bytes()
    blob.unlink()
    run_cli("verify", "tiny", check=1)
    blob.write_bytes(saved)
    run_cli("verify", "tiny")
    assert cli_json("show", "tiny")["status"] == "ready"


def test_quick_verify_reads_no_bytes_and_notices_changes(home, tiny_model):
    import_here(tiny_model, "tiny")
    out = run_cli("verify", "--quick", "tiny").stdout
    assert "stat stamps only, bytes not read" in out
    report = cli_json("verify", "--quick", "tiny")
    assert report["artifacts"][0]["bytes_read"] == 0 and report["ok"]
    sha = {f["path"]: f["sha256"] for f in cli_json("show", "tiny")["file_list"]}["config.json"]
    blob = home / "blobs" / "sha256" / sha[:2] / sha
    os.utime(blob, ns=(0, 12345))
    proc = run_cli("verify", "--quick", "tiny", check=1)
    assert "CHANGED     config.json" in proc.stdout
    run_cli("verify", "tiny")  # a full verify re-hashes, finds it intact and refreshes the stamp
    run_cli("verify", "--quick", "tiny")


def test_dedup_second_import_adds_zero_bytes(home, tiny_model, tmp_path):
    first = cli_json("import", str(tiny_model), "--name", "tiny")
    assert first["bytes_added"] == sum(p.stat().st_size for p in tiny_model.iterdir())
    again = cli_json("import", str(tiny_model), "--name", "tiny")
    assert again["bytes_added"] == 0 and again["created"] is False and again["digest"] == first["digest"]
    # A second model that shares only the tokenizer files stores just its own weights and config.
    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    (other / "model.safetensors").write_bytes((tiny_model / "model.safetensors").read_bytes()[:-4] + b"abcd")
    second = cli_json("import", str(other), "--name", "other")
    assert second["bytes_added"] == (other / "model.safetensors").stat().st_size
    assert len(blob_files(home)) == 6


def test_link_import_hardlinks_source(home, tiny_model):
    run_cli("import", str(tiny_model), "--name", "tiny", "--link")
    sha = {f["path"]: f["sha256"] for f in cli_json("show", "tiny")["file_list"]}["model.safetensors"]
    blob = home / "blobs" / "sha256" / sha[:2] / sha
    assert blob.stat().st_ino == (tiny_model / "model.safetensors").stat().st_ino
    run_cli("verify", "tiny")


def test_export_loads_with_transformers_and_passes_sha256sum(home, tiny_model, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import_here(tiny_model, "tiny")
    dest = tmp_path / "export"
    assert run_cli("export", "tiny", str(dest)).stdout.strip() == str(dest)
    sums = run_cli("manifest", "tiny", "--format", "sha256sum").stdout
    check = subprocess.run(["sha256sum", "-c"], input=sums, text=True, capture_output=True, cwd=dest)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.count(": OK") == 5
    model = AutoModelForCausalLM.from_pretrained(dest)
    tokenizer = AutoTokenizer.from_pretrained(dest)
    ids = tokenizer("<s>Human: What is a model registry?", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    reference = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        assert torch.equal(logits, reference(ids).logits)
    copied = tmp_path / "copied"
    run_cli("export", "tiny", str(copied), "--copy")
    assert (copied / "config.json").stat().st_ino != (dest / "config.json").stat().st_ino
    assert _run_unprivileged("sh", "-c", 'printf x >> "$1"', "sh", str(copied / "config.json")).returncode == 0
    run_cli("verify", "tiny")  # writing the copy left the store's blob as it was


def _run_unprivileged(*command: str) -> subprocess.CompletedProcess:
    """Run a command as a user without root's power to write anything (root minus CAP_DAC_OVERRIDE)."""
    drop = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--"] if os.geteuid() == 0 else []
    return subprocess.run([*drop, *command], capture_output=True)


def test_path_gives_stable_read_only_snapshot(home, tiny_model):
    from transformers import AutoModelForCausalLM

    import_here(tiny_model, "tiny")
    first = run_cli("path", "tiny").stdout.strip()
    assert run_cli("path", "tiny").stdout.strip() == first
    config = os.path.join(first, "config.json")
    before = open(config, "rb").read()
    assert _run_unprivileged("sh", "-c", 'printf x >> "$1"', "sh", config).returncode != 0
    assert _run_unprivileged("touch", os.path.join(first, "new.txt")).returncode != 0
    assert open(config, "rb").read() == before and sorted(os.listdir(first)) == sorted(os.listdir(tiny_model))
    assert oct(os.stat(first).st_mode & 0o777) == "0o555"
    assert oct(os.stat(os.path.join(first, "config.json")).st_mode & 0o777) == "0o444"
    AutoModelForCausalLM.from_pretrained(first)


def test_export_refuses_non_empty_folder(home, tiny_model, tmp_path):
    import_here(tiny_model, "tiny")
    dest = tmp_path / "busy"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    proc = run_cli("export", "tiny", str(dest), check=2)
    assert "not an empty folder" in proc.stderr
    assert sorted(p.name for p in dest.iterdir()) == ["keep.txt"]


def test_manifest_digest_and_digest_refs(home, tiny_model):
    out = cli_json("import", str(tiny_model), "--name", "tiny")
    raw = run_cli("manifest", "tiny").stdout.encode()
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == out["digest"]
    manifest = json.loads(raw)
    assert [f["path"] for f in manifest["files"]] == sorted(f["path"] for f in manifest["files"])
    assert cli_json("show", out["digest"][:15])["name"] == "tiny"
    proc = run_cli("show", "sha256:abc", check=2)
    assert "at least 8 hex digits" in proc.stderr


def test_tag_moves_and_resolves(home, tiny_model, tmp_path):
    a = cli_json("import", str(tiny_model), "--name", "tiny")
    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    config = json.loads((tiny_model / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "note": "v2"}))
    b = cli_json("import", str(other), "--name", "tiny-v2")
    assert b["digest"] != a["digest"]
    run_cli("tag", "tiny", "tiny:prod")
    assert cli_json("show", "tiny:prod")["digest"] == a["digest"]
    moved = run_cli("tag", "tiny-v2", "tiny:prod").stdout
    assert "moved from" in moved
    assert cli_json("show", "tiny:prod")["digest"] == b["digest"]
    assert cli_json("show", "tiny-v2")["tags"] == ["tiny:prod"]
    assert [e["kind"] for e in cli_json("show", "tiny-v2")["events"]] == ["registered", "tagged"]


def test_rm_then_gc_frees_bytes(home, tiny_model):
    import_here(tiny_model, "tiny")
    run_cli("path", "tiny")
    total = sum(p.stat().st_size for p in tiny_model.iterdir())
    assert "would free" in run_cli("gc", "--dry-run").stdout
    assert cli_json("gc")["bytes_freed"] == 0
    run_cli("tag", "tiny", "tiny:prod")
    assert "and its tags tiny:prod;" in run_cli("rm", "tiny").stdout  # a tag going with it is said
    run_cli("show", "tiny", check=3)
    run_cli("show", "tiny:prod", check=3)
    dry = cli_json("gc", "--dry-run")
    assert dry["bytes_freed"] == total and len(blob_files(home)) == 5
    out = run_cli("gc").stdout
    assert f"({total} bytes)" in out and "5 blobs" in out and "1 snapshots" in out
    assert blob_files(home) == []
    assert cli_json("list") == []
    # The name is free again once the artifact is deleted.
    run_cli("import", str(tiny_model), "--name", "tiny")


def test_gc_removes_stale_temp_files(home, tiny_model):
    import_here(tiny_model, "tiny")
    stale = home / "tmp" / "ingest-crashed"
    stale.write_bytes(b"x" * 1000)
    os.utime(stale, (os.path.getmtime(stale) - 600,) * 2)  # gc leaves temp files of the last 2 minutes alone
    report = cli_json("gc")
    assert report["temp_files"] == ["ingest-crashed"] and report["bytes_freed"] == 1000
    assert not stale.exists()
    run_cli("verify", "tiny")
