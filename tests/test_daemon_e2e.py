"""The daemon end to end (issue 10): a tiny LoRA adapter copied into a watched drop folder is imported, merged
into its base and quantized to int4 on the CPU by a real `registry daemon` and its worker process, and the
result is tagged, with lineage back to the base and the adapter. On SQLite and PostgreSQL."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REGISTRY_BIN
from test_merge import make_peft_adapter
from tinymodel import synthetic_corpus

from registry import Registry, jobs
from registry.catalog import details, resolve
from registry.daemon import state
from registry.errors import NotFound
from registry.importer import import_folder
from registry.models import Event, Job

# Generous: on a loaded 2-core machine, the worker's start, torch and GPTQModel imports, the merge and GPTQ.
TIMEOUT = int(os.environ.get("E2E_TIMEOUT", "300"))


def wait_for(what: str, check, reg: Registry, log: Path, timeout: float = TIMEOUT, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            with reg.read_session() as s:
                queue = [(j.id, j.type, j.state, j.attempts, j.lease_owner, j.error) for j in s.query(Job)]
            pytest.fail(f"timed out waiting for {what}; jobs {queue}; daemon log:\n{log.read_text()[-4000:]}")
        time.sleep(interval)


@pytest.fixture(scope="module")
def adapter(tiny_model_template, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("e2e-adapter")
    return make_peft_adapter(tiny_model_template, root / "lora", seed=3, r=4, lora_alpha=8,
                             target_modules=["q_proj", "v_proj"])


def test_dropped_adapter_becomes_a_tagged_int4_model(db_url, home, tiny_model_template, adapter, tmp_path):
    reg = Registry()
    reg.init()
    import_folder(reg, tiny_model_template, "llama")
    drop = tmp_path / "drop"
    drop.mkdir()
    calibration = tmp_path / "calib.txt"
    calibration.write_text("\n\n".join(synthetic_corpus(60)) + "\n")
    config = tmp_path / "daemon.toml"
    config.write_text(f"""
state_interval = 0.5
[scrub]
enabled = false
[prune]
enabled = false
[[watch]]
path = "{drop}"
quiet_seconds = 1
rescan = "1s"
[[pipeline]]
name = "chat-int4"
when = {{ kind = "adapter", base = "llama" }}
merge = {{}}
tag = "{{name}}:int4"
every = "0.5s"
[pipeline.quantize]
bits = 4
group_size = 32
samples = 16
seq_len = 64
evaluate = false
device = "cpu"
calibration = "{calibration}"
""")
    log = tmp_path / "daemon.log"
    with open(log, "w") as out:
        daemon = subprocess.Popen([REGISTRY_BIN, "daemon", "--config", str(config), "--workers", "1"],
                                  stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
    try:
        def pipeline_ticked() -> bool:
            for d in state.read_all(home, jobs.this_host()):
                if d["pid"] == daemon.pid:
                    return any(s.get("name") == "pipeline:chat-int4" and s.get("ticks") for s in d["services"])
            assert daemon.poll() is None, f"the daemon exited {daemon.returncode}:\n{log.read_text()}"
            return False

        # The rule applies to artifacts registered after it was first seen: drop the adapter once it was.
        wait_for("the pipeline's first look", pipeline_ticked, reg, log)
        staging = tmp_path / "staging" / "lora-a"
        shutil.copytree(adapter, staging)
        (staging / "registry.json").write_text(json.dumps({"kind": "adapter", "base": "llama"}))
        staging.rename(drop / "lora-a")  # as a finished copy lands

        def tagged():
            assert daemon.poll() is None, f"the daemon exited {daemon.returncode}:\n{log.read_text()}"
            with reg.read_session() as s:
                failed = s.query(Job).filter(Job.state == "failed").all()
                assert not failed, [(j.type, j.error) for j in failed]
                try:
                    return details(s, resolve(s, "lora-a:int4"))
                except NotFound:
                    return None

        int4 = wait_for("lora-a:int4", tagged, reg, log, interval=0.5)
        with reg.read_session() as s:
            merged = details(s, resolve(s, "lora-a-merged"))
            lora = details(s, resolve(s, "lora-a"))
            ran = [(j.type, j.state) for j in s.query(Job).order_by(Job.id)]
            events = {e.kind for e in s.query(Event)}
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            code = daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            raise
    assert code == 0, log.read_text()
    assert (int4["name"], int4["kind"]) == ("lora-a-merged-gptq-int4", "quantized")
    assert [(p["name"], p["role"]) for p in int4["lineage"]["parents"]] == [("lora-a-merged", "base")]
    assert sorted((p["name"], p["role"]) for p in merged["lineage"]["parents"]) == [("llama", "base"),
                                                                                   ("lora-a", "adapter")]
    assert lora["kind"] == "adapter"
    assert int4["provenance"]["quantization"]["calibration"]["source"] == "calib.txt"
    assert ran == [("import", "succeeded"), ("merge", "succeeded"), ("quantize", "succeeded")]
    assert {"drop_queued", "pipeline_fired"} <= events
