"""Items 2 and 3: jobs name artifacts by id, so two artifacts with one digest are never mixed up; a corrupt or
incomplete artifact is refused by export, path, merge, quantize and generate."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from conftest import blob_files, cli_json, import_here, run_cli
from test_lineage import make_adapter


def _error(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def _corrupt_blob(home, sha: str) -> None:
    blob = home / "blobs" / "sha256" / sha[:2] / sha
    os.chmod(blob, 0o644)
    with open(blob, "r+b") as f:
        f.seek(10)
        f.write(b"XXXX")


def test_same_digest_twice_verify_checks_the_named_one_and_marks_every_holder(db_url, tiny_model, tmp_path):
    a = import_here(tiny_model, "tiny")
    b = import_here(tiny_model, "tiny2")
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.safetensors").write_bytes((tiny_model / "model.safetensors").read_bytes())
    import_here(other, "weights-only")  # shares only the weights, not config.json
    assert a["digest"] == b["digest"]
    sha = {f["path"]: f["sha256"] for f in cli_json("show", "tiny2")["file_list"]}["config.json"]
    _corrupt_blob(_home(), sha)
    proc = run_cli("verify", "tiny2", check=1)
    assert proc.stdout.startswith("tiny2 ")  # the report is about the artifact named
    assert "also marked corrupt (they share the damaged files): tiny\n" in proc.stdout
    assert cli_json("show", "tiny2")["status"] == "corrupt"
    # tiny holds the same damaged blob, so exporting it must not hand out the damaged bytes.
    assert cli_json("show", "tiny")["status"] == "corrupt"
    assert [e["kind"] for e in cli_json("show", "tiny")["events"]] == ["registered", "marked_corrupt"]
    run_cli("export", "tiny", str(tmp_path / "out"), check=1)
    assert cli_json("show", "weights-only")["status"] == "ready"
    job = cli_json("jobs")[0]
    assert job["type"] == "verify" and job["params"]["artifact_ids"] == [b["artifact_id"]]


def _home() -> Path:
    return Path(os.environ["REGISTRY_HOME"])


def test_digest_prefix_of_two_artifacts_is_ambiguous(db_url, tiny_model):
    out = import_here(tiny_model, "tiny2")
    import_here(tiny_model, "tiny")
    err = _error(run_cli("show", out["digest"][:16], check=2))
    assert "matches 2 artifacts (tiny, tiny2)" in err and "name one of them" in err
    run_cli("manifest", out["digest"], check=2)
    run_cli("rm", "tiny")
    assert cli_json("show", out["digest"][:16])["name"] == "tiny2"


def test_merge_links_lineage_to_the_artifacts_named(db_url, tiny_model, tmp_path):
    import_here(tiny_model, "tiny")
    import_here(tiny_model, "tiny2")
    adapter = make_adapter(tmp_path / "lora", "tiny2")
    import_here(adapter, "lora", base="tiny2")
    import_here(adapter, "lora-copy", base="tiny2")
    out = cli_json("merge", "tiny2", "lora-copy")
    assert out["name"] == "lora-copy-merged"
    parents = cli_json("show", "lora-copy-merged")["lineage"]["parents"]
    assert sorted((p["name"], p["role"]) for p in parents) == [("lora-copy", "adapter"), ("tiny2", "base")]
    assert cli_json("show", "tiny")["lineage"]["children"] == []
    job = cli_json("jobs")[0]
    ids = {a["name"]: a["id"] for a in cli_json("list")}
    assert (job["params"]["base_id"], job["params"]["adapter_id"]) == (ids["tiny2"], ids["lora-copy"])


def test_job_for_a_removed_artifact_fails_cleanly(home, tiny_model):
    run_cli("import", str(tiny_model), "--name", "tiny")
    job = cli_json("verify", "tiny", "--detach")["job"]
    run_cli("rm", "tiny")
    run_cli("import", str(tiny_model), "--name", "tiny")  # same name and digest, another artifact
    run_cli("worker", "--once")
    done = cli_json("job", str(job))
    assert done["state"] == "failed" and done["exit_code"] == 3
    assert "tiny" in done["error"] and "was removed" in done["error"]
    assert [e["kind"] for e in cli_json("show", "tiny")["events"]] == ["registered"]


def _mark(db_url: str, name: str, status: str) -> None:
    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE artifacts SET status = :s WHERE name = :n AND status != 'deleted'"),
                     dict(s=status, n=name))
    engine.dispose()


def test_corrupt_and_incomplete_artifacts_are_refused(db_url, tiny_model, tmp_path):
    from registry import Registry
    from registry.errors import OperationFailed
    from registry.generate import generate

    home = _home()
    import_here(tiny_model, "tiny")
    import_here(make_adapter(tmp_path / "lora", "tiny"), "lora")
    sha = {f["path"]: f["sha256"] for f in cli_json("show", "tiny")["file_list"]}["model.safetensors"]
    _corrupt_blob(home, sha)
    run_cli("verify", "tiny", check=1)
    blobs_before, jobs_before = blob_files(home), len(cli_json("jobs"))
    advice = "run `registry verify tiny` to see which, then `registry repair tiny`"
    for args in (["export", "tiny", str(tmp_path / "out")], ["path", "tiny"], ["merge", "tiny", "lora"],
                 ["quantize", "tiny", "--no-eval"]):
        err = _error(run_cli(*args, check=1))
        assert "tiny is corrupt (registry verify found damaged or missing files)" in err and advice in err, args
    # generate as a library call: the command imports transformers before it looks at the ref (seconds).
    with pytest.raises(OperationFailed) as refused:
        next(generate(Registry(), "tiny", "hi", max_new_tokens=2))
    assert "tiny is corrupt (registry verify found damaged or missing files)" in str(refused.value)
    assert advice in str(refused.value)
    assert not (tmp_path / "out").exists() and not list(home.glob("snapshots/*"))
    assert blob_files(home) == blobs_before and len(cli_json("jobs")) == jobs_before
    assert [a["name"] for a in cli_json("list")] == ["lora", "tiny"]
    # An adapter input is checked too, and `incomplete` (files never stored) is refused the same way.
    import_here(tiny_model, "good")
    _mark(db_url, "lora", "incomplete")
    err = _error(run_cli("merge", "good", "lora", "--force", check=1))
    assert "lora is incomplete" in err and "`registry repair lora`" in err
    err = _error(run_cli("export", "lora", str(tmp_path / "out2"), check=1))
    assert "lora is incomplete" in err and not (tmp_path / "out2").exists()


# Quantize's catalog side on both backends (a quick quantization: small calibration, no evaluation); the full
# run with the defaults, its files, evaluation and generation: test_quantize.py, on SQLite.
def test_quantize_links_lineage_to_the_artifact_named(db_url, tiny_model):
    import_here(tiny_model, "tiny")
    import_here(tiny_model, "tiny2")
    out = cli_json("quantize", "tiny2", "--no-eval", "--group-size", "32", "--samples", "8", "--seq-len", "32")
    assert out["name"] == "tiny2-gptq-int4"
    shown = cli_json("show", "tiny2-gptq-int4")
    assert [(p["name"], p["role"]) for p in shown["lineage"]["parents"]] == [("tiny2", "base")]
    assert cli_json("show", "tiny")["lineage"]["children"] == []
    assert cli_json("jobs")[0]["params"]["source_id"] == cli_json("show", "tiny2")["id"]
    assert shown["provenance"]["quantization"]["bits"] == 4 and "quantization" not in shown["metadata"]
