"""The /v1 JSON API of `registry serve`, through httpx against a real uvicorn, on SQLite and PostgreSQL.

One catalog per backend is built for the module with library calls (small folders written with numpy: no torch),
and served in a thread (tests/serving.py). Tests that change it use their own artifacts and tokens.
"""
from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import _create_pg_database, _drop_pg_database, _pg_url, run_cli
from serving import make_token, serve_in_thread

from registry import Registry, catalog
from registry.db import dispose_all
from registry.importer import import_folder
from registry.manifest import canonical_json


def write_model(folder: Path, seed: int, model_type: str = "llama") -> Path:
    """A tiny model-shaped folder (config + one safetensors file); `seed` makes its content distinct."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": model_type, "num_hidden_layers": 2}))
    save_file({"w": np.full((4, 4), seed, np.float32)}, str(folder / "model.safetensors"))
    return folder


def write_adapter(folder: Path, base_name: str) -> Path:
    """A LoRA adapter folder in peft's layout that names `base_name` as its base."""
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "base_model_name_or_path": base_name, "r": 4, "lora_alpha": 8,
        "target_modules": ["q_proj"], "task_type": "CAUSAL_LM", "inference_mode": True, "lora_dropout": 0.05}))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((4, 64), np.float32)},
              str(folder / "adapter_model.safetensors"))
    return folder


class Catalog:
    """The served registry of one backend, its URL, tokens and the folders its artifacts came from."""

    def __init__(self, reg: Registry, url: str, work: Path, env: dict[str, str]):
        self.reg, self.url, self.work, self.env = reg, url, work, env
        self.secrets = {role: make_token(reg, role, f"{role}-api") for role in ("read", "write", "admin")}

    def client(self, role: str | None = "read") -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.secrets[role]}"} if role else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def run_worker(self) -> None:
        """What `registry worker --once` does, in a thread (a worker in the main thread would take over its
        signals)."""
        from registry.workers import worker_loop

        thread = threading.Thread(target=worker_loop, args=(self.reg,), kwargs={"once": True})
        thread.start()
        thread.join(60)

    def add(self, name: str, seed: int, **kw) -> dict:
        return import_folder(self.reg, write_model(self.work / name, seed), name, **kw).to_dict()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def served(request, tmp_path_factory):
    """Base, adapter, merged and quantized artifacts in one lineage, plus an unrelated base and a tag."""
    work = tmp_path_factory.mktemp(f"api-{request.param}")
    home = work / "home"
    pg_name = _create_pg_database() if request.param == "postgresql" else None
    env = {"REGISTRY_HOME": str(home)}
    if pg_name:
        env["REGISTRY_DATABASE_URL"] = _pg_url(pg_name)
    mp = pytest.MonkeyPatch()
    for key, value in env.items():  # for any library call that makes its own Registry()
        mp.setenv(key, value)
    if not pg_name:
        mp.delenv("REGISTRY_DATABASE_URL", raising=False)
    mp.delenv("HF_ENDPOINT", raising=False)
    reg = Registry(str(home), env.get("REGISTRY_DATABASE_URL"))
    reg.init()
    try:
        with serve_in_thread(reg) as url:
            c = Catalog(reg, url, work, env)
            c.add("Tiny-Base", 1)
            import_folder(reg, write_adapter(work / "lora", "Tiny-Base"), "tiny-lora")  # linked to its base
            c.add("tiny-merged", 2, kind="merged")
            c.add("tiny-merged-int4", 3, kind="quantized")
            c.add("other-base", 4)
            import_folder(reg, write_model(work / "mistral", 5, "mistral"), "mistral-7b")
            with reg.session() as s:
                merged, quantized = catalog.resolve(s, "tiny-merged"), catalog.resolve(s, "tiny-merged-int4")
                catalog.link(s, merged, catalog.resolve(s, "tiny-lora"), "adapter")
                catalog.link(s, merged, catalog.resolve(s, "Tiny-Base"), "base")
                catalog.link(s, quantized, merged, "base")
                catalog.set_tag(s, "Tiny-Base", "tiny:prod")
            yield c
    finally:
        mp.undo()
        dispose_all()
        if pg_name:
            _drop_pg_database(pg_name)


def names(items: list[dict]) -> list[str]:
    return [i["name"] for i in items]


LIVE = ["mistral-7b", "other-base", "tiny-merged-int4", "tiny-merged", "tiny-lora", "Tiny-Base"]  # newest first


def test_search_filters_and_pages(served):
    with served.client() as c:
        everything = c.get("/v1/artifacts").json()
        assert everything["total"] >= 6 and everything["limit"] == 50 and everything["offset"] == 0
        # The items are what `registry list --json` prints for them.
        with served.reg.read_session() as s:
            expected = [catalog.summary(s, a) for a in catalog.list_artifacts(s)]
        assert everything["items"] == expected
        assert [n for n in names(everything["items"]) if n in LIVE] == LIVE

        def found(**params) -> list[str]:
            answer = c.get("/v1/artifacts", params=params)
            assert answer.status_code == 200, answer.text
            return names(answer.json()["items"])

        assert found(q="TINY-M") == ["tiny-merged-int4", "tiny-merged"]  # substring, any case
        assert found(q="%") == [] and found(q="_") == []  # LIKE wildcards are plain characters
        assert found(kind="adapter") == ["tiny-lora"]
        assert found(kind="quantized", q="tiny") == ["tiny-merged-int4"]
        assert found(base="Tiny-Base") == ["tiny-merged", "tiny-lora"]  # children in any role
        assert found(base="tiny:prod") == ["tiny-merged", "tiny-lora"]  # a tag is a ref
        assert found(base="tiny-lora") == ["tiny-merged"]
        assert found(meta="model_type=mistral") == ["mistral-7b"]
        # A number is matched as JSON writes it; a nested key is dotted; every filter must hold.
        assert set(found(meta="parameter_count=16")) == {"Tiny-Base", "tiny-merged", "tiny-merged-int4", "other-base",
                                                         "mistral-7b"}
        assert found(meta=["peft_config.r=4", "peft_config.peft_type=LORA"]) == ["tiny-lora"]
        assert found(meta=["model_type=llama", "kind=base"]) == []
        assert found(meta="peft_config.inference_mode=true") == ["tiny-lora"]  # JSON true, on both backends
        assert found(meta="peft_config.inference_mode=1") == []
        assert found(meta="peft_config.lora_dropout=0.05") == ["tiny-lora"]
        assert found(meta="model_type=llama", kind="base", q="other") == ["other-base"]

        pages = [c.get("/v1/artifacts", params={"limit": 2, "offset": o}).json() for o in (0, 2, 4)]
        assert all(p["total"] == everything["total"] and p["limit"] == 2 for p in pages)
        assert sum((names(p["items"]) for p in pages), []) == names(everything["items"])[:6]
        past = c.get("/v1/artifacts", params={"offset": 1000}).json()
        assert past["items"] == [] and past["total"] == everything["total"]

        for params, status, message in (({"meta": "model_type"}, 422, "is not KEY=VALUE"),
                                        ({"meta": "a'b=1"}, 422, "meta key"),
                                        ({"kind": "blob"}, 422, "kind"),
                                        ({"limit": 0}, 422, "limit"),
                                        ({"base": "nope"}, 404, "no artifact, tag or digest named 'nope'"),
                                        ({"q": "a\x00b"}, 422, "NUL")):
            answer = c.get("/v1/artifacts", params=params)
            assert answer.status_code == status, (params, answer.text)
            error = answer.json()["error"]
            assert message in error["message"] and error["exit_code"] == (3 if status == 404 else 2), error


def test_show_lineage_and_manifest(served):
    with served.client() as c:
        shown = c.get("/v1/artifacts/tiny:prod").json()
        with served.reg.read_session() as s:
            assert shown == catalog.details(s, catalog.resolve(s, "Tiny-Base"))  # = `registry show --json`
        assert shown["name"] == "Tiny-Base" and shown["tags"] == ["tiny:prod"]
        assert {f["path"] for f in shown["file_list"]} == {"config.json", "model.safetensors"}
        assert c.get(f"/v1/artifacts/{shown['digest'][:15]}").json()["name"] == "Tiny-Base"

        # The adapter's graph: its base above, the merged and quantized models below; not the unrelated base.
        graph = c.get("/v1/artifacts/tiny-lora/lineage").json()
        ids = {n["name"]: n["id"] for n in graph["nodes"]}
        assert set(ids) == {"Tiny-Base", "tiny-lora", "tiny-merged", "tiny-merged-int4"}
        assert {(e["parent"], e["child"], e["role"]) for e in graph["edges"]} == {
            (ids["Tiny-Base"], ids["tiny-lora"], "base"), (ids["tiny-lora"], ids["tiny-merged"], "adapter"),
            (ids["Tiny-Base"], ids["tiny-merged"], "base"), (ids["tiny-merged"], ids["tiny-merged-int4"], "base")}
        assert all(set(n) == {"id", "name", "kind", "digest", "status"} for n in graph["nodes"])
        lonely = c.get("/v1/artifacts/other-base/lineage").json()
        assert names(lonely["nodes"]) == ["other-base"] and lonely["edges"] == []

        m = c.get("/v1/artifacts/tiny-merged/manifest").json()
        assert set(m) == {"digest", "manifest", "metadata", "provenance"}
        assert "sha256:" + hashlib.sha256(canonical_json(m["manifest"])).hexdigest() == m["digest"]

        missing = c.get("/v1/artifacts/org/not-there/manifest")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_tags_and_events_name_the_token(served):
    with served.client("write") as w, served.client("read") as r:
        moved = w.put("/v1/tags/tiny:candidate", json={"ref": "other-base"})
        assert moved.status_code == 200 and moved.json()["previous"] is None
        moved = w.put("/v1/tags/tiny:candidate", json={"ref": "tiny-merged"}).json()
        assert moved["name"] == "tiny-merged" and moved["previous"].startswith("sha256:")
        tags = {t["tag"]: t for t in r.get("/v1/tags").json()}
        assert tags["tiny:candidate"]["name"] == "tiny-merged" and tags["tiny:prod"]["name"] == "Tiny-Base"
        assert tags["tiny:candidate"]["updated_at"].endswith("Z")

        refused = r.put("/v1/tags/tiny:candidate", json={"ref": "other-base"})
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"
        bad = w.put("/v1/tags/tiny-lora", json={"ref": "other-base"})  # a tag may not be an artifact's name
        assert bad.status_code == 409 and "names and tags share one namespace" in bad.json()["error"]["message"]
        assert w.put("/v1/tags/x:y", json={"ref": "other-base", "force": True}).status_code == 422  # unknown field

        events = r.get("/v1/events", params={"artifact": "tiny-merged", "limit": 5}).json()
        tagged = events[0]
        assert tagged["kind"] == "tagged" and tagged["artifact"] == "tiny-merged"
        assert tagged["actor"] == "token:write-api" and tagged["detail"]["tag"] == "tiny:candidate"
        assert all(e["artifact"] == "tiny-merged" for e in events)
        assert [e["id"] for e in events] == sorted((e["id"] for e in events), reverse=True)  # newest first
        registered = [e for e in r.get("/v1/events", params={"limit": 1000}).json() if e["kind"] == "registered"]
        assert registered and all(e["actor"] is None for e in registered)  # library calls on this host


def test_verify_job_submitted_run_by_a_worker_and_deduplicated_with_the_cli(served):
    with served.client("write") as w, served.client("read") as r:
        queued = w.post("/v1/jobs", json={"type": "verify", "refs": ["tiny:prod", "tiny-lora"]})
        assert queued.status_code == 202, queued.text
        job = queued.json()
        assert job["type"] == "verify" and job["state"] == "queued" and job["created"] is True
        again = w.post("/v1/jobs", json={"type": "verify", "refs": ["tiny-lora", "Tiny-Base"]}).json()
        assert again["job"] == job["job"] and again["created"] is False  # the same artifacts: one job
        # The CLI builds the same request: it attaches to the job the API queued.
        cli = json.loads(run_cli("verify", "Tiny-Base", "tiny-lora", "--detach", "--json", env=served.env).stdout)
        assert cli["job"] == job["job"]

        shown = r.get(f"/v1/jobs/{job['job']}").json()
        assert shown["params"]["artifact_ids"] and shown["state"] == "queued"
        served.run_worker()
        done = r.get(f"/v1/jobs/{job['job']}").json()
        assert done["state"] == "succeeded", done
        assert sorted(a["name"] for a in done["result"]["artifacts"]) == ["Tiny-Base", "tiny-lora"]
        assert job["job"] in [j["id"] for j in r.get("/v1/jobs", params={"state": "succeeded"}).json()]
        assert all(j["state"] == "queued" for j in r.get("/v1/jobs", params={"state": "queued"}).json())

        finished = w.post(f"/v1/jobs/{job['job']}/cancel").json()
        assert finished == {"job": job["job"], "state": "succeeded", "cancelled": False}
        other = w.post("/v1/jobs", json={"type": "repair", "ref": "other-base"}).json()
        assert w.post(f"/v1/jobs/{other['job']}/cancel").json() == {"job": other["job"], "state": "cancelled",
                                                                    "cancelled": True}
        assert r.post(f"/v1/jobs/{other['job']}/cancel").status_code == 403
        assert r.get("/v1/jobs/999999").status_code == 404
        assert w.post("/v1/jobs", json={"type": "verify", "refs": ["x"]}, headers={"Authorization": ""}) \
            .status_code == 401


BAD_JOBS = [
    ({"type": "quantize", "ref": "tiny-merged", "bits": 5}, 422, "bits: Input should be 2, 3, 4 or 8"),
    ({"type": "quantize", "ref": "tiny-merged", "group_size": 0}, 422, "--group-size 0 is not valid"),
    ({"type": "quantize", "ref": "tiny-merged", "device": "tpu"}, 422, "device"),
    ({"type": "quantize", "ref": "tiny-lora"}, 422, "tiny-lora is an adapter; merge it into its base first"),
    ({"type": "quantize", "ref": "tiny-merged-int4"}, 422, "already quantized"),
    ({"type": "quantize", "ref": "tiny-merged", "name": "tiny:prod"}, 409, "'tiny:prod' is already a tag"),
    ({"type": "quantize", "ref": "tiny-merged", "calibration": "/etc/passwd"}, 422,
     "calibration would name a path on the server's host"),
    ({"type": "repair", "ref": "tiny-merged", "from_dir": "/backup"}, 422, "from_dir would name a path"),
    ({"type": "pull", "repo": "org/model", "token_file": "/root/token"}, 422, "token_file would name a path"),
    ({"type": "pull", "repo": "org/model", "endpoint": "http://evil.example"}, 422,
     "endpoint http://evil.example is not trusted by this server (its workers' config.toml has no [[endpoints]] "
     "entry for it); ask the server's admin"),  # no host path, no fix only the admin can make
    ({"type": "pull", "repo": "../etc"}, 422, "malformed repo id"),
    ({"type": "merge", "base": "Tiny-Base", "adapter": "other-base"}, 422, "other-base is a base, not an adapter"),
    ({"type": "merge", "base": "Tiny-Base", "adapter": "tiny-lora", "dtype": "int3"}, 422, "dtype"),
    ({"type": "merge", "base": "Tiny-Base", "adapter": "tiny-lora", "allow_pickle": True}, 422, "allow_pickle"),
    ({"type": "verify"}, 422, "name at least one artifact to verify, or pass --all"),
    ({"type": "verify", "refs": ["nope"]}, 404, "no artifact, tag or digest named 'nope'"),
    ({"type": "import", "folder": "/srv/models"}, 422, "type"),
    ({"refs": ["Tiny-Base"]}, 422, "type"),
]


@pytest.mark.parametrize("body,status,message", BAD_JOBS, ids=[f"{b.get('type')}-{i}" for i, (b, _, _) in
                                                                 enumerate(BAD_JOBS)])
def test_bad_job_requests_are_refused_with_the_reason(served, body, status, message):
    with served.client("write") as w:
        before = len(w.get("/v1/jobs", params={"limit": 1000}).json())
        answer = w.post("/v1/jobs", json=body)
        assert answer.status_code == status, answer.text
        error = answer.json()["error"]
        assert message in error["message"] and "\n" not in error["message"], error
        assert error["exit_code"] == {404: 3, 409: 2, 422: 2}[status]
        assert len(w.get("/v1/jobs", params={"limit": 1000}).json()) == before  # nothing queued


def test_quantize_choices_match_the_quantizer():
    """The API offers the quantizer's own choices, from its torch-free part: the server checks a quantize request
    without loading torch (registry.quantize imports it)."""
    import subprocess
    import sys

    from registry import quantize, submit

    assert (submit.QUANTIZE_BITS, submit.QUANTIZE_DEVICES) == (quantize.BITS, quantize.DEVICES)
    code = ("import sys, registry.submit, registry.server.api, registry.daemon.pipelines; "
            "print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_merge_and_quantize_jobs_are_queued_with_the_cli_params(served):
    with served.client("write") as w:
        merge = w.post("/v1/jobs", json={"type": "merge", "base": "Tiny-Base", "adapter": "tiny-lora",
                                         "name": "api-merged", "dtype": "bf16"}).json()
        quant = w.post("/v1/jobs", json={"type": "quantize", "ref": "tiny-merged", "bits": 8, "evaluate": False})
        assert quant.status_code == 202, quant.text
        with served.reg.read_session() as s:
            ids = {n: catalog.resolve(s, n).id for n in ("Tiny-Base", "tiny-lora", "tiny-merged")}
        params = {j["id"]: j["params"] for j in w.get("/v1/jobs").json()}
        assert params[merge["job"]] == {"base_id": ids["Tiny-Base"], "adapter_id": ids["tiny-lora"],
                                        "name": "api-merged", "dtype": "bf16", "check": False, "force": False,
                                        "allow_pickle": False}
        options = params[quant.json()["job"]]["options"]
        assert params[quant.json()["job"]]["source_id"] == ids["tiny-merged"]
        assert options["bits"] == 8 and options["evaluate"] is False and options["calibration"] is None
        for job in (merge["job"], quant.json()["job"]):  # leave no job for another test's worker
            assert w.post(f"/v1/jobs/{job}/cancel").json()["cancelled"] is True


def test_rm_needs_admin_and_gc_runs_as_a_job(served):
    served.add("doomed", 99)
    with served.client("write") as w, served.client("admin") as a:
        a.put("/v1/tags/doomed:v1", json={"ref": "doomed"})
        refused = w.delete("/v1/artifacts/doomed")
        assert refused.status_code == 403 and "admin token" in refused.json()["error"]["message"]
        derived = a.delete("/v1/artifacts/Tiny-Base")
        assert derived.status_code == 409 and "has derived artifacts" in derived.json()["error"]["message"]
        removed = a.delete("/v1/artifacts/doomed")
        assert removed.status_code == 200, removed.text
        assert removed.json()["name"] == "doomed" and removed.json()["tags"] == ["doomed:v1"]
        assert a.get("/v1/artifacts/doomed").status_code == 404
        assert "doomed" not in names(a.get("/v1/artifacts").json()["items"])
        gone = a.get("/v1/artifacts", params={"q": "doomed", "deleted": True}).json()["items"]
        assert [(i["name"], i["status"]) for i in gone] == [("doomed", "deleted")]
        deleted = a.get("/v1/events", params={"limit": 1}).json()[0]
        assert deleted["kind"] == "deleted" and deleted["actor"] == "token:admin-api"

        assert w.post("/v1/gc").status_code == 403
        gc = a.post("/v1/gc")
        assert gc.status_code == 202 and gc.json()["type"] == "gc"
        served.run_worker()
        done = a.get(f"/v1/jobs/{gc.json()['job']}").json()
        assert done["state"] == "succeeded" and done["result"]["blobs_count"] >= 1  # doomed's weights


def test_tokens_through_the_api(served):
    with served.client("admin") as a, served.client("write") as w:
        made = a.post("/v1/tokens", json={"name": "ci-bot", "role": "read"})
        assert made.status_code == 201, made.text
        secret = made.json()["token"]
        assert secret.startswith("rgt_") and made.json()["role"] == "read"
        listed = a.get("/v1/tokens").json()
        assert "ci-bot" in [t["name"] for t in listed] and secret not in json.dumps(listed)
        with httpx.Client(base_url=served.url, headers={"Authorization": f"Bearer {secret}"}) as bot:
            assert bot.get("/v1/whoami").json() == {"token": "ci-bot", "role": "read"}
            assert a.delete("/v1/tokens/ci-bot").json()["revoked_at"] is not None
            assert bot.get("/v1/whoami").status_code == 401
        assert "ci-bot" in [t["name"] for t in a.get("/v1/tokens", params={"all": True}).json()]
        assert "ci-bot" not in [t["name"] for t in a.get("/v1/tokens").json()]
        assert a.post("/v1/tokens", json={"name": "x", "role": "root"}).status_code == 422
        assert a.delete("/v1/tokens/ci-bot").status_code == 404
        assert w.get("/v1/tokens").status_code == 403
        created = [e for e in a.get("/v1/events").json() if e["kind"] == "token-created"]
        assert created[0]["detail"] == {"name": "ci-bot", "role": "read"} and created[0]["actor"] == "token:admin-api"


def test_health_is_public(served):
    assert httpx.get(served.url + "/v1/health").json() == {"ok": True, "schema": "0006"}
    assert httpx.get(served.url + "/v1/whoami").status_code == 401
