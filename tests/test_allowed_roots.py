"""Host paths in job parameters are checked against the worker's `[paths] allowed_roots` (issue 8, item 11):
import folders, Hugging Face cache folders and calibration files, with symlinks resolved first."""
from __future__ import annotations

import shutil

import pytest

from conftest import cli_json, run_cli
from test_lineage import _fake_hf_cache


@pytest.fixture
def roots(home, tmp_path):
    """A config.toml allowing two roots; returns (allowed root, a folder outside every root)."""
    allowed, other, outside = tmp_path / "allowed", tmp_path / "calibration", tmp_path / "outside"
    for p in (allowed, other, outside, home):
        p.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(f'[paths]\nallowed_roots = ["{allowed}", "{other}"]\n')
    return allowed, outside


def test_import_outside_the_roots_is_refused_by_the_worker(roots, db_url, tiny_model, tmp_path):
    allowed, outside = roots
    inside_model = allowed / "llama"
    shutil.copytree(tiny_model, inside_model)
    outside_model = outside / "llama"
    shutil.copytree(tiny_model, outside_model)
    job = cli_json("import", str(outside_model), "--name", "evil", "--detach")["job"]
    run_cli("worker", "--once")
    failed = cli_json("job", str(job))
    assert (failed["state"], failed["exit_code"], failed["attempts"]) == ("failed", 2, 1)
    assert f"import folder {outside_model} is outside this worker's allowed roots ({allowed}, " in failed["error"]
    assert "allowed_roots in " in failed["error"]
    # A symlink inside a root that leads outside is judged by where it leads.
    (allowed / "sneaky").symlink_to(outside_model)
    proc = run_cli("import", str(allowed / "sneaky"), "--name", "evil", check=2)
    assert f"import folder {allowed / 'sneaky'} (resolves to {outside_model}) is outside" in proc.stderr
    assert proc.stderr.count("\n") == 1
    assert cli_json("list") == []
    run_cli("import", str(inside_model), "--name", "tiny")
    assert [a["name"] for a in cli_json("list")] == ["tiny"]


def test_hf_cache_outside_the_roots_is_refused(roots, tiny_model):
    allowed, outside = roots
    _fake_hf_cache(outside / "hf-cache", "acme/tiny-llama", tiny_model)
    proc = run_cli("import", "--hf-cache", "acme/tiny-llama", "--cache-dir", str(outside / "hf-cache"), check=2)
    assert f"Hugging Face cache folder {outside / 'hf-cache'} is outside this worker's allowed roots" in proc.stderr
    _fake_hf_cache(allowed / "hf-cache", "acme/tiny-llama", tiny_model)
    run_cli("import", "--hf-cache", "acme/tiny-llama", "--cache-dir", str(allowed / "hf-cache"))


def test_calibration_file_outside_the_roots_is_refused(roots, tiny_model):
    pytest.importorskip("torch")
    allowed, outside = roots
    shutil.copytree(tiny_model, allowed / "llama")
    run_cli("import", str(allowed / "llama"), "--name", "tiny")
    secret = outside / "secret.txt"
    secret.write_text("not for a queued job to read\n")
    proc = run_cli("quantize", "tiny", "--calibration", str(secret), "--no-eval", check=2)
    assert f"calibration file {secret} is outside this worker's allowed roots" in proc.stderr
    (allowed / "calib.txt").symlink_to(secret)
    proc = run_cli("quantize", "tiny", "--calibration", str(allowed / "calib.txt"), "--no-eval", check=2)
    assert f"(resolves to {secret}) is outside" in proc.stderr


def test_no_roots_means_any_path(home, tiny_model):
    run_cli("import", str(tiny_model), "--name", "tiny")
