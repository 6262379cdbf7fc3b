"""`registry repair`: restore an artifact's missing or damaged blobs from its source (issue 8, items 3 and 14)."""
from __future__ import annotations

import json
import os

from conftest import cli_json, import_here, run_cli
from hubproxy import HubProxy
from conftest import _random_safetensors  # the hub and hubp fixtures (olah behind a proxy) are in conftest


def _blob(home, artifact: str, path: str):
    """The blob of one of the artifact's files, as `registry show` lists them (read in-process: faster)."""
    from registry import Registry
    from registry.catalog import resolve

    with Registry().read_session() as s:
        sha = {f.path: f.sha256 for f in resolve(s, artifact).files}[path]
    return home / "blobs" / "sha256" / sha[:2] / sha


def _flip_byte(blob, offset: int = 10) -> None:
    os.chmod(blob, 0o644)
    with open(blob, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_repair_an_imported_artifact_from_its_folder(db_url, home, tiny_model):
    import_here(tiny_model, "tiny")
    _flip_byte(_blob(home, "tiny", "model.safetensors"), 1000)
    _blob(home, "tiny", "tokenizer.json").unlink()
    run_cli("verify", "tiny", check=1)
    assert cli_json("show", "tiny")["status"] == "corrupt"
    out = run_cli("repair", "tiny").stdout
    assert "2 of 5 files damaged" in out
    assert "restored    model.safetensors (was mismatch)" in out and "restored    tokenizer.json (was missing)" in out
    assert "tiny is ready" in out
    run_cli("verify", "tiny")
    shown = cli_json("show", "tiny")
    assert shown["status"] == "ready"
    repaired = [e for e in shown["events"] if e["kind"] == "repaired"]
    assert repaired and sorted(repaired[0]["detail"]["restored"]) == ["model.safetensors", "tokenizer.json"]
    assert [j["type"] for j in shown["jobs"]].count("repair") == 1
    # Nothing left to do: exit 0, nothing restored, the quick check agrees with the new stamps.
    report = cli_json("repair", "tiny")
    assert (report["damaged"], report["restored"], report["status"]) == ([], [], "ready")
    run_cli("verify", "--quick", "tiny")


def test_repair_fails_when_the_source_folder_changed(db_url, home, tiny_model):
    import_here(tiny_model, "tiny")
    blob = _blob(home, "tiny", "model.safetensors")
    _flip_byte(blob, 1000)
    (tiny_model / "model.safetensors").write_bytes(b"retrained weights")
    proc = run_cli("repair", "tiny", check=1)
    assert "CANNOT      model.safetensors:" in proc.stdout
    assert f"{tiny_model / 'model.safetensors'} has changed since it was imported" in proc.stdout
    assert "tiny is corrupt; the source folder" in proc.stdout and "import the folder again" in proc.stdout
    assert proc.stderr.startswith("error: tiny: cannot restore model.safetensors;")
    report = json.loads(run_cli("repair", "tiny", "--json", check=1).stdout)
    assert report["unrestorable"][0]["path"] == "model.safetensors" and report["ok"] is False
    assert cli_json("show", "tiny")["status"] == "corrupt"
    assert os.path.exists(blob)  # the damaged blob is kept while nothing better exists


def test_repair_a_pulled_artifact_downloads_only_the_damaged_files(hubp, db_url, home):
    run_cli("pull", "acme/big")
    _flip_byte(_blob(home, "acme/big", "model.safetensors"), 5000)
    _blob(home, "acme/big", "config.json").unlink()
    hubp.proxy.reset()
    out = run_cli("repair", "acme/big").stdout
    assert "2 of 3 files damaged" in out and "acme/big is ready" in out
    assert hubp.proxy.sent == {"model.safetensors": len(_random_safetensors(1, 3)),
                               "config.json": len(b'{"model_type": "llama"}')}
    run_cli("verify", "acme/big")
    assert cli_json("show", "acme/big")["status"] == "ready"


def test_repair_refuses_an_untrusted_recorded_endpoint(hubp, home):
    other = HubProxy(hubp.olah.url)
    try:
        run_cli("pull", "acme/big", "--endpoint", other.url)
        _blob(home, "acme/big", "config.json").unlink()
        other.reset()
        proc = run_cli("repair", "acme/big", env={"HF_TOKEN": "hf_workerSECRET123"}, check=2)
        assert f"endpoint {other.url} is not trusted by this worker" in proc.stderr
        assert other.requests == []
    finally:
        other.shutdown()


def test_repair_refuses_removed_and_unknown_artifacts(home, tiny_model):
    import_here(tiny_model, "tiny")
    run_cli("rm", "tiny")
    assert "tiny was removed (registry rm) and cannot be repaired" in run_cli("repair", "tiny", check=3).stderr
    assert "no artifact, tag or digest named 'nope'" in run_cli("repair", "nope", check=3).stderr


def test_detached_repair_runs_on_a_worker(db_url, home, tiny_model):
    import_here(tiny_model, "tiny")
    _blob(home, "tiny", "config.json").unlink()
    queued = cli_json("repair", "tiny", "--detach")
    job = cli_json("job", str(queued["job"]))
    assert job["type"] == "repair" and job["params"]["artifact_id"] == cli_json("show", "tiny")["id"]
    run_cli("worker", "--once")
    done = cli_json("job", str(queued["job"]))
    assert done["state"] == "succeeded" and done["result"]["restored"] == ["config.json"]
    run_cli("verify", "tiny")


def test_repair_replaces_the_damaged_file_and_stale_snapshots(db_url, home, tiny_model):
    import hashlib
    from pathlib import Path

    import_here(tiny_model, "tiny")
    snapshot = Path(run_cli("path", "tiny").stdout.strip())  # shares the blob's inode
    blob = _blob(home, "tiny", "model.safetensors")
    good = hashlib.sha256(blob.read_bytes()).hexdigest()
    _flip_byte(blob, 1000)  # damages the snapshot's file too: it is the same inode
    run_cli("verify", "tiny", check=1)
    run_cli("repair", "tiny")
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == good
    fresh = Path(run_cli("path", "tiny").stdout.strip())
    assert hashlib.sha256((fresh / "model.safetensors").read_bytes()).hexdigest() == good
    assert fresh == snapshot  # same place, rebuilt from the restored blob
