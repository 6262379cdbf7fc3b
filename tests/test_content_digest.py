"""Item 13: the digest is a function of the kind and the files only; provenance is a separate record; migration
0004 recomputes the digests of an existing catalog."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from datetime import datetime

from sqlalchemy import JSON, bindparam, create_engine, text

from conftest import cli_json, import_here, run_cli
from test_lineage import make_adapter


def _files_of(folder: Path) -> list[dict]:
    return sorted(({"path": p.name, "size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
                   for p in folder.iterdir()), key=lambda f: f["path"])


def _digest(doc: dict) -> str:
    raw = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def content_digest(folder: Path, kind: str = "base") -> str:
    """What the README promises: sha256 of the canonical {schema 2, kind, files}, computable from the files alone."""
    return _digest({"schema": 2, "kind": kind, "files": _files_of(folder)})


def test_digest_is_the_content_and_provenance_is_separate(home, tiny_model, tmp_path):
    out = cli_json("import", str(tiny_model), "--name", "tiny")
    assert out["digest"] == content_digest(tiny_model)
    raw = run_cli("manifest", "tiny").stdout.encode()
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == out["digest"]
    assert json.loads(raw) == {"schema": 2, "kind": "base", "files": _files_of(tiny_model)}
    full = cli_json("manifest", "tiny")
    assert full["digest"] == out["digest"] and full["manifest"] == json.loads(raw)
    assert full["metadata"]["model_type"] == "llama"
    assert full["provenance"]["job_id"] == cli_json("show", "tiny")["jobs"][0]["id"]
    assert full["provenance"]["host"] and full["provenance"]["created_at"]
    assert cli_json("show", "tiny")["provenance"] == full["provenance"]
    assert "provenance:      job " in run_cli("show", "tiny").stdout
    # Another registry (another home, another time and job) gives the same digest for the same files.
    other = run_cli("import", str(tiny_model), "--name", "elsewhere", "--json",
                    env={"REGISTRY_HOME": str(tmp_path / "other-home")})
    assert json.loads(other.stdout)["digest"] == out["digest"]


def test_merge_with_and_without_check_has_one_digest(db_url, tiny_model, tmp_path):
    from registry import Registry
    from registry.merge import merge

    import_here(tiny_model, "tiny")
    import_here(make_adapter(tmp_path / "lora", "tiny"), "lora")
    plain = cli_json("merge", "tiny", "lora", "--name", "m")
    # --check as library calls in this process, where peft is loaded once: as a command each loads it again
    # (seconds); `merge --check` as a command is test_merge.py::test_merge_check_and_dtype.
    checked = merge(Registry(), "tiny", "lora", name="m-checked", check=True)
    assert checked.digest == plain["digest"]
    assert "check" not in cli_json("show", "m")["provenance"]["merge"]
    assert cli_json("show", "m-checked")["provenance"]["merge"]["check"]["max_logit_diff"] < 1e-3
    # The same name and digest again (now with --check) is a no-op: the first provenance is kept, and this
    # run's is in the result.
    again = merge(Registry(), "tiny", "lora", name="m", check=True)
    assert again.created is False and again.digest == plain["digest"]
    assert "check" in again.provenance["merge"]
    assert "check" not in cli_json("show", "m")["provenance"]["merge"]
    text_out = run_cli("show", "m-checked").stdout
    assert "merge:           r 4, alpha 8" in text_out and "merge check:" in text_out


def test_migration_0004_recomputes_digests_and_moves_provenance(db_url, tiny_model, tmp_path):
    from registry.db import dispose_all, migrate

    files = _files_of(tiny_model)
    old_meta = {"model_type": "llama"}
    old_base = _digest({"schema": 1, "kind": "base", "files": files, "metadata": old_meta})
    merge_facts = {"base_digest": old_base, "adapter_digest": "sha256:" + "a" * 64, "r": 4, "lora_alpha": 8,
                   "versions": {"torch": "2.0"}, "check": {"max_logit_diff": 1e-7}}
    merged_meta = {"model_type": "llama", "merge": merge_facts}
    old_merged = _digest({"schema": 1, "kind": "merged", "files": files, "metadata": merged_meta})
    engine = create_engine(db_url)
    migrate(engine, "0003")
    with engine.begin() as conn:
        for f in files:
            conn.execute(text("INSERT INTO blobs (sha256, size) VALUES (:sha256, :size)"), f)
        for id_, name, kind, digest, meta in ((1, "tiny", "base", old_base, old_meta),
                                              (2, "tiny-merged", "merged", old_merged, merged_meta)):
            conn.execute(text("INSERT INTO artifacts (id, name, kind, status, digest, total_size, meta, created_at) "
                              "VALUES (:id, :name, :kind, 'ready', :digest, 0, :meta, :at)")
                         .bindparams(bindparam("meta", type_=JSON)),
                         dict(id=id_, name=name, kind=kind, digest=digest, meta=meta, at=datetime(2026, 1, 1)))
            for f in files:
                conn.execute(text("INSERT INTO files (artifact_id, path, sha256, size) VALUES (:a, :path, :sha256, "
                                  ":size)"), dict(a=id_, **f))
        conn.execute(text("INSERT INTO edges (child_id, parent_id, role) VALUES (2, 1, 'base')"))
        conn.execute(text("INSERT INTO tags (name, artifact_id, updated_at) VALUES ('tiny:prod', 1, :at)"),
                     dict(at=datetime(2026, 1, 1)))
    migrate(engine)
    engine.dispose()
    dispose_all()
    fresh = json.loads(run_cli("import", str(tiny_model), "--name", "fresh", "--json",
                               env={"REGISTRY_HOME": str(tmp_path / "fresh-home"),
                                    "REGISTRY_DATABASE_URL": ""}).stdout)["digest"]
    shown = cli_json("show", "tiny:prod")  # the tag still resolves
    assert shown["name"] == "tiny" and shown["digest"] == fresh != old_base
    assert shown["provenance"]["schema_1_digest"] == old_base
    merged = cli_json("show", "tiny-merged")
    assert merged["digest"] == content_digest(tiny_model, "merged")
    assert "merge" not in merged["metadata"] and merged["metadata"]["model_type"] == "llama"
    assert merged["provenance"]["merge"]["check"] == {"max_logit_diff": 1e-7}
    assert merged["provenance"]["merge"]["base_digest"] == fresh  # rewritten to the base's new digest
    assert [(p["name"], p["role"]) for p in merged["lineage"]["parents"]] == [("tiny", "base")]
    assert cli_json("show", fresh[:20])["name"] == "tiny"
