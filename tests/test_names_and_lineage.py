"""Issue 9, items 4 and 5: pulled adapters are linked to their base as imported ones are, lineage can be
repaired (`registry link`, or importing again with --base), and names and tags share one namespace."""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest

from conftest import cli_json, import_here, run_cli, tag_here
from hubproxy import make_repo
from test_fsck import _lose_catalog
from test_lineage import make_adapter


def _error(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def _parents(ref: str) -> list[tuple[str, str, str]]:
    """(name, role, status) of each parent, as `registry show REF` lists them (read in-process: faster)."""
    from registry import Registry
    from registry.catalog import lineage, resolve

    with Registry().read_session() as s:
        return [(p["name"], p["role"], p["status"]) for p in lineage(s, resolve(s, ref))["parents"]]


# -- item 4: lineage on pull, repair, registry link ------------------------------------------------------------

def test_pulled_adapter_is_linked_to_its_base_and_generate_finds_it(db_url, hubp, tmp_path):
    from registry import Registry
    from registry.export import snapshot_path
    from registry.generate import _model_dirs

    repo = f"acme/lora-{uuid.uuid4().hex[:8]}"  # the hub is shared by every test of the session
    make_repo(hubp.mirrors, repo, make_adapter(tmp_path / "lora", "acme/tiny"))
    run_cli("pull", "acme/tiny")
    out = cli_json("pull", repo)
    assert out["kind"] == "adapter"
    assert _parents(repo) == [("acme/tiny", "base", "ready")]  # as `registry import` of the same folder links it
    reg = Registry()
    # What `registry generate` loads: the base, with the adapter on top (it failed: "no registered base").
    assert _model_dirs(reg, repo) == (str(snapshot_path(reg, "acme/tiny")), str(snapshot_path(reg, repo)))


def test_import_again_repairs_a_link_to_a_removed_base(db_url, tiny_model, tmp_path):
    explicit = make_adapter(tmp_path / "explicit", "some/other-name")
    detected = make_adapter(tmp_path / "detected", "tiny")
    old = import_here(tiny_model, "tiny")["digest"]
    import_here(explicit, "explicit", base="tiny")
    import_here(detected, "detected")
    run_cli("rm", "tiny", "--force")
    import_here(tiny_model, "tiny")
    assert _parents("explicit") == [("tiny", "base", "deleted")]
    out = run_cli("import", str(explicit), "--name", "explicit", "--base", "tiny").stdout
    assert "already registered explicit" in out  # it said this, and kept the link to the removed base
    assert f"linked explicit -> tiny (base), replacing tiny {old[:19]} (removed)" in out
    assert _parents("explicit") == [("tiny", "base", "ready")]
    # Without --base, the base its adapter_config.json names is linked again the same way.
    assert "linked detected -> tiny (base)" in run_cli("import", str(detected), "--name", "detected").stdout
    assert _parents("detected") == [("tiny", "base", "ready")]
    # An explicit --base that contradicts a live link is refused, not silently ignored.
    import_here(tiny_model, "tiny2")
    err = _error(run_cli("import", str(explicit), "--name", "explicit", "--base", "tiny2", check=2))
    assert "explicit is already linked to base tiny" in err
    assert "registry link explicit tiny2 --role base --force" in err


def test_link_validates_records_and_survives_a_catalog_rebuild(db_url, tiny_model, tmp_path):
    from registry import Registry
    from registry.catalog import details, link, remove_artifact, resolve, trained_on
    from registry.db import dispose_all
    from registry.errors import BadInput, Conflict
    from registry.export import snapshot_path
    from registry.generate import _model_dirs
    from registry.models import Artifact

    import_here(tiny_model, "tiny")
    import_here(tiny_model, "tiny2")
    import_here(make_adapter(tmp_path / "lora", "nobody/knows"), "lora")
    assert _parents("lora") == []
    reg = Registry()
    with pytest.raises(BadInput, match="lora is an adapter with no registered base; import its base, then link "
                                       "it: registry link lora BASE --role base"):
        _model_dirs(reg, "lora")  # what `registry generate lora` says
    assert run_cli("link", "lora", "tiny", "--role", "base").stdout.startswith("linked lora -> tiny (base, sha256:")
    assert _model_dirs(reg, "lora")[0] == str(snapshot_path(reg, "tiny"))
    with reg.session() as s:  # merge finds the base as generate does: no --force needed for the linked one
        assert trained_on(s, resolve(s, "tiny"), resolve(s, "lora"))
    assert "was already linked; nothing changed" in run_cli("link", "lora", "tiny").stdout
    err = _error(run_cli("link", "lora", "tiny2", check=2))
    assert err.startswith("error: lora is already linked to base tiny (sha256:")
    assert err.endswith("); to replace it: registry link lora tiny2 --role base --force")
    out = cli_json("link", "lora", "tiny2", "--force")
    assert out["changed"] and out["parent"] == "tiny2" and out["replaced"][0]["name"] == "tiny"
    run_cli("link", "tiny2", "tiny")  # tiny2 derives from tiny: tiny -> tiny2 would close a cycle
    assert "would make a cycle" in _error(run_cli("link", "tiny", "tiny2", check=2))
    with reg.session() as s:
        for child, parent, role, message in [("lora", "lora", "base", "cannot link lora to itself"),
                                             ("tiny", "lora", "base", "lora is an adapter, not a base model"),
                                             ("tiny", "lora", "adapter", "role adapter links a merged model")]:
            with pytest.raises(BadInput, match=message):
                link(s, resolve(s, child), resolve(s, parent), role)
        events = [e for e in details(s, resolve(s, "lora"))["events"] if e["kind"] == "linked"]
        assert [(e["detail"]["parent"], e["detail"]["role"]) for e in events] == [("tiny", "base"), ("tiny2", "base")]
    run_cli("fsck")  # the records follow the catalog
    dispose_all()  # this process's pooled connections must not hold the SQLite file we are about to lose
    _lose_catalog(db_url, Path(os.environ["REGISTRY_HOME"]))
    run_cli("fsck", "--rebuild-catalog")
    assert _parents("lora") == [("tiny2", "base", "ready")] and _parents("tiny2") == [("tiny", "base", "ready")]
    with reg.session() as s:  # a removed parent is refused
        gone = remove_artifact(s, "tiny2", force=True).id
    with reg.session() as s, pytest.raises(Conflict, match=r"tiny2 \(sha256:\w+\) was removed"):
        link(s, resolve(s, "lora"), s.get(Artifact, gone), "base", force=True)


# -- item 5: names and tags share one namespace --------------------------------------------------------------

def test_names_and_tags_share_one_namespace(db_url, hubp, tiny_model, tmp_path):
    import_here(tiny_model, "llama-7b")
    tag_here("llama-7b", "prod")
    tag_here("llama-7b", "acme/big")  # a tag that happens to be a repo id
    other = shutil.copytree(tiny_model, tmp_path / "other")
    (other / "generation_config.json").write_text('{"max_length": 7}')  # other content
    err = _error(run_cli("import", str(other), "--name", "prod", check=2))
    assert err == ("error: 'prod' is already a tag (pointing at llama-7b); names and tags share one namespace: "
                   "choose another --name, or move the tag away first")
    # pull's default name (the repo id) is a tag here: it takes the name it takes when another artifact has it
    out = cli_json("pull", "acme/big")
    pulled = f"acme/big@{out['commit'][:12]}"
    assert out["name"] == pulled and out["tag"] == "acme/big:main"
    err = _error(run_cli("pull", "acme/tiny", "--name", "prod", check=2))
    assert "'prod' is already a tag (pointing at llama-7b)" in err and "choose another --name" in err
    err = _error(run_cli("tag", "llama-7b", pulled, check=2))
    assert f"tag '{pulled}' is the name of another artifact" in err and "choose another tag" in err
    assert "tag 'llama-7b' is the artifact's own name" in _error(run_cli("tag", "llama-7b", "llama-7b", check=2))
    assert {a["name"]: a["tags"] for a in cli_json("list")} == {
        "llama-7b": ["acme/big", "prod"], pulled: ["acme/big:main"]}  # every name and tag reaches its artifact
