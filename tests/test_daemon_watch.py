"""Watch folders of `registry daemon` (issue 10, item 2): drop folders and Trainer output folders are imported
once, when complete; broken folders become one failed job; a full disk pauses the watch and resumes it.

Every test that touches the catalog runs on SQLite and PostgreSQL (`db_url`). Ticks are driven directly
(`WatchService.tick`), one test goes through the watchdog observer, and queued jobs run in-process with
`worker_loop(once=True)`; real processes are the supervisor's tests.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from conftest import write_safetensors_header
from test_lineage import make_adapter
from registry import Registry
from registry.catalog import list_artifacts, resolve, tags_of
from registry.cli.daemon import _print_daemon
from registry.daemon.folders import training_facts
from registry.daemon.options import ConfigErrors
from registry.daemon.watch import WatchConfig, WatchService, parse_watches, watch_services
from registry.models import Artifact, Edge, Event, Job
from registry.workers import worker_loop

QUIET = 0.3


@pytest.fixture
def reg(db_url) -> Registry:
    r = Registry()
    r.init()
    return r


@pytest.fixture(scope="session")
def trainer_run(tiny_model_template, tmp_path_factory) -> Path:
    """A real Hugging Face Trainer run on the tiny Llama: 4 steps, a checkpoint every 2, evaluation every 2,
    then save_model and save_state into the output_dir (about 4 s on a CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    class Tokens(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            ids = torch.randint(3, 300, (16,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids}

    out = tmp_path_factory.mktemp("trainer") / "run"
    torch.manual_seed(0)
    args = TrainingArguments(output_dir=str(out), max_steps=4, save_steps=2, logging_steps=1, eval_strategy="steps",
                             eval_steps=2, per_device_train_batch_size=4, report_to=[], use_cpu=True,
                             save_only_model=True, disable_tqdm=True)
    trainer = Trainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_template), args=args,
                      train_dataset=Tokens(), eval_dataset=Tokens())
    trainer.train()
    trainer.save_model()
    trainer.save_state()
    return out


def service(reg: Registry, root: Path, mode: str = "drop", **kw) -> WatchService:
    config = WatchConfig(path=root, mode=mode, quiet_seconds=kw.pop("quiet_seconds", QUIET), rescan=60, **kw)
    return WatchService(reg, config, observe=False)


def tick_until(svc: WatchService, done, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        svc.tick()
        if done():
            return
        assert time.monotonic() < deadline, f"timed out; status: {svc.status()}"
        time.sleep(0.05)


def tick_for(svc: WatchService, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        svc.tick()
        time.sleep(0.05)


def import_jobs(reg: Registry) -> list[dict]:
    with reg.read_session() as s:
        return [{"id": j.id, "state": j.state, "params": j.params, "error": j.error, "exit_code": j.exit_code}
                for j in s.scalars(select(Job).where(Job.type == "import").order_by(Job.id))]


def events(reg: Registry, *kinds: str) -> list[Event]:
    with reg.read_session() as s:
        rows = s.scalars(select(Event).where(Event.kind.in_(kinds)).order_by(Event.id)).all()
        return [(e.kind, e.job_id, dict(e.detail)) for e in rows]


def artifact(reg: Registry, ref: str) -> dict:
    with reg.read_session() as s:
        a = resolve(s, ref)
        parents = s.execute(select(Edge.role, Edge.parent_id).where(Edge.child_id == a.id)).all()
        names = {pid: s.get(Artifact, pid).name for _, pid in parents}
        return {"name": a.name, "kind": a.kind, "meta": a.meta, "files": sorted(f.path for f in a.files),
                "parents": [(names[pid], role) for role, pid in parents], "tags": tags_of(s, a.id),
                "status": a.status}


def artifact_names(reg: Registry) -> list[str]:
    with reg.read_session() as s:
        return sorted(a.name for a in list_artifacts(s))


# --- drop folders ---------------------------------------------------------------------------------------------

def test_drop_folder_is_imported_once_when_complete(reg, tiny_model, tmp_path):
    drop = tmp_path / "drop"
    drop.mkdir()
    svc = service(reg, drop, quiet_seconds=1.0)
    svc.tick()
    # A copy in progress: the safetensors file arrives in pieces, truncated (its header points past the end).
    folder = drop / "llama-drop"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy2(tiny_model / name, folder / name)
    data = (tiny_model / "model.safetensors").read_bytes()
    chunks = [data[i:i + len(data) // 8 + 1] for i in range(0, len(data), len(data) // 8 + 1)]
    with open(folder / "model.safetensors", "wb") as f:
        for chunk in chunks:
            f.write(chunk)
            f.flush()
            tick_for(svc, 0.15)  # still changing: waiting, never a failure
            assert import_jobs(reg) == []
    assert svc.status()["waiting"] == [{"folder": str(folder), "why": "waiting for writes to stop"}]
    for name in sorted(os.listdir(tiny_model)):
        if not (folder / name).exists():
            shutil.copy2(tiny_model / name, folder / name)
    tick_until(svc, lambda: import_jobs(reg))
    [job] = import_jobs(reg)
    assert job["state"] == "queued" and job["params"]["name"] == "llama-drop"
    assert job["params"]["folder"] == str(folder)
    assert events(reg, "drop_queued")[0][1] == job["id"]
    worker_loop(reg, once=True)
    assert import_jobs(reg)[0]["state"] == "succeeded"
    shown = artifact(reg, "llama-drop")
    assert shown["kind"] == "base" and "model.safetensors" in shown["files"]
    assert shown["meta"]["watch"] == {"path": str(drop), "mode": "drop"}
    # Rescans, and a restarted daemon (a new service with nothing in memory), queue nothing more.
    tick_for(svc, 2 * QUIET)
    restarted = service(reg, drop)
    restarted.tick()
    assert restarted.status()["waiting"] == []  # its trigger is found at once: no quiet wait, no header reads
    tick_for(restarted, 2 * QUIET)
    assert len(import_jobs(reg)) == 1
    status = svc.status()
    assert (status["folders_queued"], status["failures"], status["paused"]) == (1, 0, False)
    assert status["counts"] == {"events_seen": 0, "folders_queued": 1, "failures": 0, "pauses": 0}
    assert status["waiting"] == []


def test_broken_folder_becomes_one_failed_job_with_the_reason(reg, tiny_model, tmp_path):
    drop = tmp_path / "drop"
    drop.mkdir()
    svc = service(reg, drop)
    broken = drop / "broken"
    broken.mkdir()
    shutil.copy2(tiny_model / "config.json", broken / "config.json")
    f32 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
    write_safetensors_header(broken / "model.safetensors", {"a": f32, "b": {**f32, "data_offsets": [32, 48]}}, 48)
    tick_until(svc, lambda: import_jobs(reg))
    [job] = import_jobs(reg)
    assert (job["state"], job["exit_code"]) == ("failed", 2)
    assert job["error"].startswith(f"{broken}: model.safetensors: invalid safetensors header (tensor 'b' offsets "
                                   "32..48 leaves a gap")
    [(kind, job_id, detail)] = events(reg, "watch_failed")
    assert job_id == job["id"] and detail["folder"] == str(broken) and "leaves a gap" in detail["reason"]
    tick_for(svc, 3 * QUIET)
    tick_for(service(reg, drop), 3 * QUIET)  # a restart does not retry it either
    assert len(import_jobs(reg)) == 1 and svc.status()["failures"] == 1
    # Fixed (new files, a new fingerprint): tried again, and imported.
    shutil.copy2(tiny_model / "model.safetensors", broken / "model.safetensors")
    tick_until(svc, lambda: len(import_jobs(reg)) == 2)
    worker_loop(reg, once=True)
    assert import_jobs(reg)[1]["state"] == "succeeded" and artifact(reg, "broken")["kind"] == "base"


@pytest.mark.parametrize("content, reason", [
    ({"nme": "x"}, "registry.json: unknown key 'nme'; known keys: name, kind, base, tags"),
    ({"tags": "prod"}, "registry.json: tags must be a list of strings, got \"prod\""),
    ({"name": 7}, "registry.json: name must be a string, got 7"),
    ({"kind": "lora"}, "registry.json: unknown kind 'lora'"),
    ({"name": "has space"}, "invalid name 'has space'"),
    ("not json", "registry.json is not valid JSON"),
])
def test_bad_registry_json_is_a_failed_job_not_a_crash(reg, tiny_model, tmp_path, content, reason):
    drop = tmp_path / "drop"
    folder = drop / "model"
    shutil.copytree(tiny_model, folder)
    (folder / "registry.json").write_text(content if isinstance(content, str) else json.dumps(content))
    svc = service(reg, drop)
    tick_until(svc, lambda: import_jobs(reg))
    [job] = import_jobs(reg)
    assert job["state"] == "failed" and reason in job["error"] and svc.last_error is None
    assert "\n" not in job["error"]


def test_registry_json_that_links_out_or_is_huge_is_refused_unread(reg, tiny_model, tmp_path):
    """The daemon reads registry.json itself: a symlink could make it read any file of the host, and a huge
    file would be loaded whole; both fail the folder's import with the reason."""
    outside = tmp_path / "secret.json"
    outside.write_text(json.dumps({"name": "from-outside"}))
    drop = tmp_path / "drop"
    linked, huge = drop / "linked", drop / "huge"
    for folder in (linked, huge):
        shutil.copytree(tiny_model, folder)
    (linked / "registry.json").symlink_to(outside)
    (huge / "registry.json").write_text(" " * (64 * 1024 + 1) + "{}")
    svc = service(reg, drop)
    tick_until(svc, lambda: len(import_jobs(reg)) == 2)
    errors = sorted(j["error"] for j in import_jobs(reg))
    assert errors == [f"{huge}: registry.json is {64 * 1024 + 3} bytes; it holds only name, kind, base, tags",
                      f"{linked}: registry.json is a symlink; write it as a file in the folder"]
    assert all(j["state"] == "failed" for j in import_jobs(reg)) and artifact_names(reg) == []


def test_index_naming_a_missing_shard_is_refused(reg, tiny_model, tmp_path):
    drop = tmp_path / "drop"
    folder = drop / "sharded"
    shutil.copytree(tiny_model, folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    tick_until(service(reg, drop), lambda: import_jobs(reg))
    [job] = import_jobs(reg)
    assert job["state"] == "failed"
    assert ("model.safetensors.index.json maps tensor 'lm_head.weight' to 'model-00002-of-00002.safetensors', "
            "which is not a safetensors file in the folder") in job["error"]


def test_registry_json_names_kind_base_tags_and_waits_for_its_base(reg, tiny_model, tmp_path, capsys):
    drop = tmp_path / "drop"
    drop.mkdir()
    svc = service(reg, drop, tags=["dropped"])
    lora = make_adapter(drop / "lora-folder", "some/base")
    (lora / "registry.json").write_text(json.dumps({"name": "my-lora", "base": "tiny", "tags": ["my-lora:prod"]}))
    tick_until(svc, lambda: svc.status()["waiting"] and "base" in svc.status()["waiting"][0]["why"])
    assert svc.status()["waiting"] == [{"folder": str(lora), "why": "waiting for base tiny to be registered"}]
    # `registry daemon status` says so, under the watch's line.
    _print_daemon({"pid": 1, "hostname": "h", "phase": "running", "started_at": time.time(), "config": "c",
                   "grace": 30.0, "pools": {}, "services": [svc.status()]})
    shown = capsys.readouterr().out.splitlines()
    assert shown[-2] == (f"    watch:{drop}: not run yet; drop: 0 file event(s), 0 import(s) queued, 0 failed; "
                         "1 folder(s) waiting")  # ticked here, not by the service's thread
    assert shown[-1] == f"      {lora}: waiting for base tiny to be registered"
    assert import_jobs(reg) == []
    shutil.copytree(tiny_model, drop / "tiny")  # the base dropped after its adapter
    tick_until(svc, lambda: len(import_jobs(reg)) == 1)
    worker_loop(reg, once=True)
    tick_until(svc, lambda: len(import_jobs(reg)) == 2)
    worker_loop(reg, once=True)
    shown = artifact(reg, "my-lora")
    assert shown["kind"] == "adapter" and shown["parents"] == [("tiny", "base")]
    assert sorted(shown["tags"]) == ["dropped", "my-lora:prod"] and "registry.json" not in shown["files"]
    assert artifact(reg, "tiny")["tags"] == [] and artifact(reg, "dropped")["name"] == "my-lora"  # moved along


# --- training output folders ------------------------------------------------------------------------------------

def test_trainer_checkpoints_and_final_model_are_registered_with_their_facts(reg, trainer_run, tiny_model, tmp_path):
    from registry.importer import import_folder

    import_folder(reg, tiny_model, "tiny")
    out = tmp_path / "out"
    out.mkdir()
    svc = service(reg, out, "training", base="tiny", name="sft-a", tags=["sft-a:latest"])
    # A checkpoint being saved: everything but trainer_state.json, which the Trainer writes last.
    (out / "checkpoint-2").mkdir()
    for name in os.listdir(trainer_run / "checkpoint-2"):
        if name != "trainer_state.json":
            shutil.copy2(trainer_run / "checkpoint-2" / name, out / "checkpoint-2" / name)
    (out / "runs").mkdir()
    (out / "runs" / "events.out.tfevents").write_bytes(b"x")
    tick_until(svc, lambda: any("trainer_state" in w["why"] for w in svc.status()["waiting"]))
    assert import_jobs(reg) == []
    shutil.copy2(trainer_run / "checkpoint-2" / "trainer_state.json", out / "checkpoint-2")
    tick_until(svc, lambda: len(import_jobs(reg)) == 1)
    shutil.copytree(trainer_run / "checkpoint-4", out / "checkpoint-4")
    tick_until(svc, lambda: len(import_jobs(reg)) == 2)
    for name in os.listdir(trainer_run):  # training ends: the final model in the output_dir itself
        if (trainer_run / name).is_file():
            shutil.copy2(trainer_run / name, out / name)
    tick_until(svc, lambda: len(import_jobs(reg)) == 3)
    assert [e[2]["role"] for e in events(reg, "checkpoint_queued")] == ["checkpoint", "checkpoint", "final"]
    worker_loop(reg, once=True)
    assert [j["state"] for j in import_jobs(reg)] == ["succeeded"] * 3
    step2 = artifact(reg, "sft-a-step-2")
    assert step2["kind"] == "checkpoint" and step2["parents"] == [("tiny", "base")]
    training = step2["meta"]["training"]
    assert (training["run"], training["step"], training["epoch"], training["output_dir"]) == ("sft-a", 2, 0.5, str(out))
    state = json.loads((trainer_run / "checkpoint-2" / "trainer_state.json").read_text())
    assert training["loss"] == [e["loss"] for e in state["log_history"] if "loss" in e][-1]
    assert training["eval"]["eval_loss"] == next(e["eval_loss"] for e in state["log_history"] if "eval_loss" in e)
    assert artifact(reg, "sft-a-step-4")["meta"]["training"]["step"] == 4
    final = artifact(reg, "sft-a")
    assert final["meta"]["training"]["final"] is True and "train_loss" in final["meta"]["training"]
    assert all("/" not in f for f in final["files"]) and "model.safetensors" in final["files"]
    assert final["parents"] == [("tiny", "base")] and final["tags"] == ["sft-a:latest"]
    tick_for(svc, 2 * QUIET)
    assert len(import_jobs(reg)) == 3


def test_adapter_checkpoints_are_adapters_and_exclude_applies(reg, trainer_run, tiny_model, tmp_path):
    from registry.importer import import_folder

    import_folder(reg, tiny_model, "tiny")
    out = tmp_path / "lora-run"
    ckpt = make_adapter(out / "checkpoint-5", "tiny")
    (ckpt / "optimizer.pt").write_bytes(b"\0" * 64)
    state = json.loads((trainer_run / "checkpoint-2" / "trainer_state.json").read_text())
    state["log_history"].append({"step": 5, "loss": float("nan"), "epoch": 1.25})
    state["global_step"] = 5
    (ckpt / "trainer_state.json").write_text(json.dumps(state))  # NaN: as the Trainer writes a diverged loss
    svc = service(reg, out, "training", exclude=["optimizer.pt"])
    tick_until(svc, lambda: import_jobs(reg))
    worker_loop(reg, once=True)
    shown = artifact(reg, "lora-run-step-5")
    assert shown["kind"] == "adapter" and shown["parents"] == [("tiny", "base")]
    assert "optimizer.pt" not in shown["files"] and "adapter_model.safetensors" in shown["files"]
    assert "loss" not in shown["meta"]["training"] and shown["meta"]["training"]["step"] == 5


def test_training_facts_read_the_last_values_up_to_the_step(tmp_path):
    state = {"global_step": 20, "epoch": 2.0, "best_metric": 0.5, "log_history": [
        {"step": 10, "loss": 3.0, "learning_rate": 1e-4}, {"step": 10, "eval_loss": 2.5},
        {"step": 20, "loss": 2.0, "learning_rate": 5e-5}, {"step": 30, "loss": 1.0}]}
    (tmp_path / "s.json").write_text(json.dumps(state))
    assert training_facts(tmp_path / "s.json") == {"step": 20, "epoch": 2.0, "loss": 2.0, "learning_rate": 5e-5,
                                                   "eval": {"eval_loss": 2.5, "step": 10}, "best_metric": 0.5}


# --- a full disk --------------------------------------------------------------------------------------------------

@pytest.fixture
def store_fs(tmp_path):
    """An 8 MiB tmpfs for the store to run out of space on (root mounts it; only a non-root run skips)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mount = tmp_path / "store-fs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], check=True, capture_output=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)])


def test_full_disk_pauses_the_watch_and_resumes_when_space_is_back(db_url, store_fs, tiny_model, tmp_path,
                                                                  monkeypatch):
    from conftest import _random_safetensors

    monkeypatch.setenv("REGISTRY_HOME", str(store_fs / "home"))
    if db_url.startswith("sqlite"):  # the catalog stays off the small file system, so failures are recorded
        monkeypatch.setenv("REGISTRY_DATABASE_URL", f"sqlite:///{tmp_path / 'catalog.db'}")
    reg = Registry()
    reg.init()
    filler = store_fs / "filler"
    filler.write_bytes(b"\0" * (shutil.disk_usage(store_fs).free - 1024 * 1024))  # 1 MiB left
    drop = tmp_path / "drop"
    big = drop / "big"
    shutil.copytree(tiny_model, big)
    (big / "extra.safetensors").write_bytes(_random_safetensors(2, 3))
    svc = service(reg, drop, disk_full_retry=0.1)
    tick_until(svc, lambda: import_jobs(reg))
    worker_loop(reg, once=True)
    [job] = import_jobs(reg)
    assert job["state"] == "failed" and "disk full" in job["error"]
    tick_until(svc, lambda: svc.status()["paused"])
    [(_, job_id, detail)] = events(reg, "watch_paused")
    assert job_id == job["id"] and detail["watch"] == str(drop) and "disk full" in detail["reason"]
    assert artifact_names(reg) == [] and list((store_fs / "home" / "tmp").iterdir()) == []  # nothing partial
    # Paused: a new folder waits, and no space has come back yet.
    shutil.copytree(tiny_model, drop / "small")
    tick_for(svc, 4 * QUIET)
    assert len(import_jobs(reg)) == 1 and events(reg, "watch_resumed") == []
    # The daemon restarts while paused: the new service is paused too, without a second event.
    svc = service(reg, drop, disk_full_retry=0.1)
    svc.tick()
    assert svc.status()["paused"] and len(events(reg, "watch_paused")) == 1
    filler.unlink()
    tick_until(svc, lambda: len(import_jobs(reg)) == 3)
    [(_, _, resumed)] = events(reg, "watch_resumed")
    assert resumed["retried"] == [job["id"]] and not svc.status()["paused"] and svc.status()["pauses"] == 1
    worker_loop(reg, once=True)
    assert [j["state"] for j in import_jobs(reg)] == ["failed", "succeeded", "succeeded"]
    assert artifact_names(reg) == ["big", "small"] and "extra.safetensors" in artifact(reg, "big")["files"]
    tick_for(service(reg, drop), 3 * QUIET)  # the retry is not queued again by another daemon
    assert len(import_jobs(reg)) == 3


# --- the watchdog observer ----------------------------------------------------------------------------------------

def test_file_events_wake_the_service(reg, tiny_model, tmp_path):
    drop = tmp_path / "drop"
    drop.mkdir()
    svc = WatchService(reg, WatchConfig(path=drop, quiet_seconds=QUIET, rescan=600))  # only events wake it
    stopping = threading.Event()
    thread = threading.Thread(target=svc.run, args=(stopping,), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while svc.ticks == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert svc.status()["observer"] is True
        shutil.copytree(tiny_model, drop / "via-events")
        deadline = time.monotonic() + 20
        while not import_jobs(reg):
            assert time.monotonic() < deadline, svc.status()
            time.sleep(0.05)
        assert svc.status()["events_seen"] > 0 and svc.status()["folders_queued"] == 1
    finally:
        stopping.set()
        thread.join(timeout=10)
    assert not thread.is_alive() and svc.status()["observer"] is False


# --- import jobs: the parameters the daemon adds, checked where the job enters the worker ------------------------

@pytest.mark.parametrize("extra, message", [
    ({"meta": {"model_type": "evil"}}, "import metadata key 'model_type' is read from the files; use another key"),
    ({"meta": ["training"]}, "import metadata must be an object with string keys"),
    ({"tags": "prod"}, "import tags must be a list of tag names"),
    ({"tags": ["bad tag"]}, "invalid tag 'bad tag'"),
    ({"exclude": [""]}, "import exclude must be a list of glob patterns"),
    ({"name": ["x"]}, "import parameter name must be a string"),
])
def test_bad_import_params_fail_the_job_once(reg, tiny_model, extra, message):
    from registry import jobs

    with reg.session() as s:
        jobs.enqueue(s, "import", {"folder": str(tiny_model), "name": "tiny", **extra})
    worker_loop(reg, once=True)
    [job] = import_jobs(reg)
    assert (job["state"], job["exit_code"]) == ("failed", 2) and message in job["error"]
    assert artifact_names(reg) == []


def test_import_params_meta_tags_exclude(reg, tiny_model):
    from registry import jobs

    with reg.session() as s:
        jobs.enqueue(s, "import", {"folder": str(tiny_model), "name": "tiny", "meta": {"training": {"step": 3}},
                                   "tags": ["tiny:prod"], "exclude": ["generation_config.json"]})
    worker_loop(reg, once=True)
    shown = artifact(reg, "tiny")
    assert shown["meta"]["training"] == {"step": 3} and shown["meta"]["model_type"] == "llama"
    assert shown["tags"] == ["tiny:prod"] and "generation_config.json" not in shown["files"]


# --- daemon.toml [[watch]] and the allowed roots ------------------------------------------------------------------

def test_parse_watches_reports_every_problem(tmp_path):
    ok, inner = tmp_path / "a", tmp_path / "a" / "b"
    inner.mkdir(parents=True)
    problems: list[str] = []
    watches = parse_watches([
        {"path": str(ok), "mode": "training", "quiet_seconds": "2s", "rescan": "5m", "base": "llama",
         "name": "run-a", "tags": ["run-a:latest"], "exclude": ["optimizer.pt"], "link": True,
         "disk_full_retry": "1m"},
        {"path": str(inner)},
        {"path": "relative/dir", "mode": "inbox", "quiet": 3},
        {"path": str(tmp_path / "missing"), "quiet_seconds": "soon", "name": "x", "link": "yes"},
        {"mode": "drop"},
    ], problems)
    first = watches[0]
    assert (first.mode, first.quiet_seconds, first.rescan, first.base, first.name, first.tags, first.exclude,
            first.link, first.disk_full_retry) == ("training", 2.0, 300.0, "llama", "run-a", ["run-a:latest"],
                                                   ["optimizer.pt"], True, 60.0)
    assert problems == [
        "watch[2].quiet: unknown key; known keys: base, disk_full_retry, exclude, link, mode, name, path, "
        "quiet_seconds, rescan, tags",
        "watch[2].path: 'relative/dir' must be an absolute path",
        "watch[2].mode: 'inbox' must be one of drop, training",
        f"watch[3].path: {tmp_path / 'missing'} is not a folder; create it or fix the path",
        "watch[3].quiet_seconds: 'soon' is not a duration; write seconds or e.g. \"30s\", \"15m\", \"1h\", \"7d\"",
        "watch[3].name: names a training run; a drop folder's imports are named after their folders "
        "(or a registry.json in them)",
        "watch[3].link: 'yes' must be true or false",
        "watch[4].path: required",
        f"watch[1].path: {inner} overlaps watch[0].path ({ok}); watch each folder once",
    ]


def test_watch_outside_the_allowed_roots_is_refused_at_start(home, tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    for p in (allowed / "drop", outside, home):
        p.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(f'[paths]\nallowed_roots = ["{allowed}"]\n')
    reg = Registry()
    services = watch_services(reg, [WatchConfig(path=allowed / "drop")])
    assert [s.name for s in services] == [f"watch:{allowed / 'drop'}"]
    with pytest.raises(ConfigErrors) as refused:
        watch_services(reg, [WatchConfig(path=allowed / "drop"), WatchConfig(path=outside)])
    assert refused.value.exit_code == 2
    assert (f"watch folder {outside} is outside this worker's allowed roots ({allowed}); move it "
            f"under one of them, or add a root to [paths] allowed_roots in {home / 'config.toml'}") in str(refused.value)


def test_every_disk_full_error_says_so_first():
    """The watch tells a full disk from other failures by the job's error (watch.is_disk_full): keep every
    DiskFull message starting with "disk full"."""
    import re

    root = Path(__file__).parent.parent / "registry"
    calls = [m for p in root.rglob("*.py") for m in re.findall(r"DiskFull\(\s*(f?\"[^\"]*)", p.read_text())]
    assert len(calls) >= 4 and all(c.lstrip("f").startswith('"disk full') for c in calls), calls
