"""Pipelines (`[[pipeline]]` in daemon.toml): rules that merge a new adapter, quantize the merged model and tag
the result, exactly once per artifact. The queueing, the watermark and a failed merge failing its quantize run
on SQLite and PostgreSQL; the real merge + CPU quantization chain runs on SQLite (the ML code is the same)."""
from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest

from test_merge import make_peft_adapter
from tinymodel import synthetic_corpus

from registry import Registry, jobs
from registry.catalog import details, resolve, set_tag
from registry.daemon import pipelines
from registry.daemon.options import ConfigErrors
from registry.daemon.pipelines import parse_pipelines, pipeline_services
from registry.importer import import_folder
from registry.models import Event, Job, Trigger
from registry.workers import worker_loop

QUANTIZE = {"bits": 4, "group_size": 32, "samples": 16, "seq_len": 64, "evaluate": False, "device": "cpu"}


@pytest.fixture(scope="module")
def models(tiny_model_template, tmp_path_factory):
    """The tiny Llama, two LoRA adapters trained on it (by path: import links them to it), a calibration file."""
    root = tmp_path_factory.mktemp("pipeline-models")
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    a = make_peft_adapter(tiny_model_template, root / "lora-a", seed=1, **lora)
    b = make_peft_adapter(tiny_model_template, root / "lora-b", seed=2, **lora)
    calibration = root / "calib.txt"
    calibration.write_text("\n\n".join(synthetic_corpus(60)) + "\n")
    return tiny_model_template, a, b, calibration


def rules(*tables: dict) -> list[pipelines.PipelineConfig]:
    problems: list[str] = []
    parsed = parse_pipelines(list(tables), problems)
    assert problems == []
    return parsed


def chat_rule(calibration: Path, **extra) -> dict:
    return {"name": "chat-int4", "when": {"kind": "adapter", "base": "llama"}, "merge": {},
            "quantize": {**QUANTIZE, "calibration": str(calibration)}, "tag": "{name}:int4", **extra}


def _jobs(reg: Registry) -> list[Job]:
    with reg.read_session() as s:
        return s.query(Job).order_by(Job.id).all()


# The ML chain on SQLite (`home`); the queueing around it runs on both backends (`db_url`) below.
def test_adapter_becomes_a_tagged_int4_model_with_lineage(home, models):
    base, lora_a, _, calibration = models
    reg = Registry()
    reg.init()
    import_folder(reg, base, "llama")
    service, = pipeline_services(reg, rules(chat_rule(calibration)))
    service.tick()  # first sight: the rule applies to what registers from now on
    import_folder(reg, lora_a, "lora-a")
    service.tick()
    assert worker_loop(reg, once=True) == 2  # the merge, then the quantize that waited for it
    service.tick()
    merge_job, quantize_job = _jobs(reg)
    assert (merge_job.type, merge_job.state, quantize_job.type, quantize_job.state) == (
        "merge", "succeeded", "quantize", "succeeded")
    assert quantize_job.after_job_id == merge_job.id
    assert quantize_job.result["tags"] == ["lora-a:int4"]
    with reg.read_session() as s:
        int4 = details(s, resolve(s, "lora-a:int4"))
        merged = details(s, resolve(s, "lora-a-merged"))
        events = [(e.kind, e.job_id, e.detail) for e in s.query(Event).filter(Event.kind == "pipeline_fired")]
    assert (int4["name"], int4["kind"]) == ("lora-a-merged-gptq-int4", "quantized")
    assert [(p["name"], p["role"]) for p in int4["lineage"]["parents"]] == [("lora-a-merged", "base")]
    assert sorted((p["name"], p["role"]) for p in merged["lineage"]["parents"]) == [("llama", "base"),
                                                                                   ("lora-a", "adapter")]
    q = int4["provenance"]["quantization"]
    assert (q["bits"], q["group_size"], q["calibration"]["source"], q["calibration"]["samples"]) == (
        4, 32, "calib.txt", 16)
    assert events == [("pipeline_fired", quantize_job.id, {"rule": "chat-int4",
                                                           "jobs": [merge_job.id, quantize_job.id]})]


def test_rules_fire_once_for_new_matching_artifacts(db_url, home, models):
    base, lora_a, lora_b, calibration = models
    reg = Registry()
    reg.init()
    import_folder(reg, base, "llama")
    import_folder(reg, lora_a, "lora-a")  # before the rules were first seen
    with reg.session() as s:
        set_tag(s, "llama", "llama:prod")
    config = rules(chat_rule(calibration),
                   {"name": "backfill", "when": {"base": "llama:prod", "name": "lora-*"}, "merge": {"dtype": "bf16"},
                    "tag": ["{base}/{name}", "{rule}-latest"], "existing": True},
                   {"name": "other-base", "when": {"base": "mistral-*"}, "merge": {}},
                   {"name": "tagged-only", "when": {"kind": ["base", "merged"], "tag": "*:prod"},
                    "quantize": QUANTIZE, "existing": True})
    first = pipeline_services(reg, config)
    for service in first:
        service.tick()
    import_folder(reg, lora_b, "lora-b")
    # Two daemons on one catalog, each ticking at once: every cause is queued once.
    second = pipeline_services(reg, config)
    threads = [threading.Thread(target=svc.tick) for svc in first + second]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for service in pipeline_services(reg, config):  # a restart
        service.tick()

    by_id = {j.id: j for j in _jobs(reg)}
    with reg.read_session() as s:
        fired = sorted(t.subject for t in s.query(Trigger).filter(Trigger.source == "pipeline",
                                                                  Trigger.job_id.is_not(None)))
        ids = {a: resolve(s, a).id for a in ("llama", "lora-a", "lora-b")}
    assert fired == sorted([f"rule:backfill:artifact:{ids['lora-a']}", f"rule:backfill:artifact:{ids['lora-b']}",
                            f"rule:chat-int4:artifact:{ids['lora-b']}",
                            f"rule:tagged-only:artifact:{ids['llama']}"])  # lora-a: existing = true only
    merges = [j for j in by_id.values() if j.type == "merge"]
    # lora-b: chat-int4 (auto) and backfill (bf16, tags) differ: two merges; lora-a: backfill only.
    assert sorted((j.params["adapter_id"], j.params["dtype"], tuple(j.params.get("tags", ()))) for j in merges) == [
        (ids["lora-a"], "bf16", ("backfill-latest", "llama/lora-a")),
        (ids["lora-b"], "auto", ()),
        (ids["lora-b"], "bf16", ("backfill-latest", "llama/lora-b"))]
    chat_merge = next(j for j in merges if j.params["dtype"] == "auto")
    assert chat_merge.params == {"base_id": ids["llama"], "adapter_id": ids["lora-b"], "name": None, "dtype": "auto",
                                 "check": False, "force": False, "allow_pickle": False}
    quantizes = [j for j in by_id.values() if j.type == "quantize"]
    chained = next(j for j in quantizes if j.after_job_id is not None)
    assert chained.after_job_id == chat_merge.id
    assert chained.params == {"name": None, "from_after": "source_id", "tags": ["lora-b:int4"],
                              "options": {**pipelines.QUANTIZE_DEFAULTS, **QUANTIZE, "calibration": str(calibration)}}
    direct = next(j for j in quantizes if j.after_job_id is None)
    assert direct.params["source_id"] == ids["llama"] and direct.params["tags"] == []
    assert len(by_id) == 5
    assert sum(svc.status()["fired"] for svc in first + second) == 4


def test_an_adapter_whose_base_registers_later_still_fires(db_url, home, models):
    base, lora_a, _, calibration = models
    reg = Registry()
    reg.init()
    service, = pipeline_services(reg, rules(chat_rule(calibration)))
    service.tick()
    import_folder(reg, lora_a, "lora-a")  # its base_model_name_or_path names a folder not imported yet
    service.tick()
    assert _jobs(reg) == [] and service.cursor == 0  # undecided: read again at the next look
    import_folder(reg, base, "llama")
    service.tick()
    assert [j.type for j in _jobs(reg)] == ["merge", "quantize"]


def test_a_failed_merge_fails_its_quantize_with_the_reason(db_url, home, models):
    base, lora_a, _, calibration = models
    reg = Registry()
    reg.init()
    import_folder(reg, base, "llama")
    with reg.session() as s:
        set_tag(s, "llama", "taken")
    service, = pipeline_services(reg, rules(chat_rule(calibration, merge={"name": "taken"})))
    service.tick()
    import_folder(reg, lora_a, "lora-a")
    service.tick()
    assert worker_loop(reg, once=True) == 1  # the quantize never runs
    merge_job, quantize_job = _jobs(reg)
    assert merge_job.state == "failed" and merge_job.attempts == 1
    assert "'taken' is already a tag" in merge_job.error
    assert quantize_job.state == "failed" and quantize_job.attempts == 0
    assert quantize_job.error == f"job {merge_job.id} (merge) it waited for failed: {merge_job.error}"
    service.tick()
    assert len(_jobs(reg)) == 2  # a failed chain is not queued again


def test_bad_job_params_fail_before_any_work(home, models):
    base = models[0]
    reg = Registry()
    reg.init()
    llama = import_folder(reg, base, "llama")
    with reg.session() as s:
        jobs.enqueue(s, "quantize", {"source_id": llama.artifact_id, "name": None, "options": {"bitz": 4}})
        jobs.enqueue(s, "quantize", {"source_id": llama.artifact_id, "name": None, "options": QUANTIZE,
                                     "tags": ["llama"]})
    assert worker_loop(reg, once=True) == 2
    bad_option, bad_tag = _jobs(reg)
    assert bad_option.state == "failed" and bad_option.exit_code == 2 and bad_option.error.startswith(
        "unknown quantize option(s) bitz in the job; known: bits, calibration,")
    assert bad_tag.state == "failed" and bad_tag.exit_code == 2 and "tag 'llama' is the name of another artifact" \
        in bad_tag.error


def test_config_is_checked_at_load(tmp_path):
    few = tmp_path / "few.txt"
    few.write_text("one\n\ntwo\n\nthree\n")
    problems: list[str] = []
    parse_pipelines([
        {"name": "a", "when": {"kind": "base"}, "merge": {"dtype": "fp8", "colour": 1},
         "quantize": {"bits": 5, "group_size": 0, "calibration": "calib.txt", "samples": 0, "seq_len": 4,
                      "device": "tpu", "max_ppl_ratio": -1, "desc_act": "yes"},
         "tag": "{name}:{variant}"},
        {"name": "a", "when": {"kind": "quantized", "size": 1}, "quantize": {"calibration": str(tmp_path / "no")}},
        {"name": "b", "when": {}, "quantize": {"calibration": str(few), "samples": 64}, "tag": "bad tag {name}",
         "every": "never", "existing": "yes"},
        {"when": {}, "extra": 1},
    ], problems)
    assert problems == [
        "pipeline[0].merge.colour: unknown key; known keys: allow_pickle, check, dtype, force, name",
        "pipeline[0].merge.dtype: 'fp8' is not a dtype; use one of: auto, bf16, fp16, fp32",
        "pipeline[0].quantize.bits: 5 is not supported; use one of 2, 3, 4, 8",
        "pipeline[0].quantize.group_size: 0 is not valid; use a positive divisor of the layers' input features "
        "(e.g. 32, 64, 128) or -1 for none",
        "pipeline[0].quantize.desc_act: 'yes' must be true or false",
        "pipeline[0].quantize.samples: 0 must be a whole number of at least 1",
        "pipeline[0].quantize.seq_len: 4 must be a whole number of at least 8",
        "pipeline[0].quantize.device: 'tpu' is not a device; use auto, cpu or cuda",
        "pipeline[0].quantize.max_ppl_ratio: -1 must be a number above 0",
        "pipeline[0].quantize.calibration: 'calib.txt' must be an absolute path (workers run in other folders)",
        "pipeline[0].when.kind: a rule with merge matches adapters only; write kind = \"adapter\"",
        "pipeline[0].tag: unknown field {variant} in '{name}:{variant}'; use {name}, {base}, {rule}, {bits}",
        f"pipeline[1].quantize.calibration: {tmp_path / 'no'} does not exist or is not a file",
        "pipeline[1].when.size: unknown key; known keys: base, kind, name, tag",
        "pipeline[1].when.kind: quantized cannot be quantized; quantize matches base, merged, checkpoint "
        "(add merge = {} to derive from adapters)",
        "pipeline[1].name: 'a' is used by another rule; names must be unique (they key what each rule has done)",
        f"pipeline[2].quantize.calibration: {few} gives 2 calibration samples after holding out 1 for evaluation, "
        "fewer than --samples 64; lower --samples or add text",
        "pipeline[2].tag: 'bad tag {name}' gives invalid tag 'bad tag my-model': use letters, digits and . _ - / : @ + "
        "without '..' (e.g. llama-7b or org/model:v1)",
        "pipeline[2].existing: 'yes' must be true or false",
        "pipeline[2].every: 'never' is not a duration; write seconds or e.g. \"30s\", \"15m\", \"1h\", \"7d\"",
        "pipeline[3].extra: unknown key; known keys: every, existing, merge, name, quantize, tag, when",
        "pipeline[3].name: required",
        "pipeline[3]: has neither merge nor quantize; give at least one step",
    ]


def test_calibration_outside_the_allowed_roots_is_refused_at_start(home, tmp_path, models):
    calibration = models[3]
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(f'[paths]\nallowed_roots = ["{tmp_path / "data"}"]\n')
    with pytest.raises(ConfigErrors) as err:
        pipeline_services(Registry(home), rules(chat_rule(calibration)))
    assert (f"pipeline 'chat-int4': quantize.calibration: calibration file {calibration} is outside this "
            "worker's allowed roots") in str(err.value)


def test_the_daemon_knows_the_quantize_and_merge_options():
    """pipelines.py takes quantize's choices from its torch-free part and keeps its own copy of merge's dtypes
    (registry.quantize and registry.merge import torch, which the daemon does not load)."""
    from registry.merge import DTYPE_CHOICES
    from registry.quantize import BITS, QuantizeOptions

    assert pipelines.BITS == BITS and tuple(DTYPE_CHOICES) == pipelines.DTYPES
    assert pipelines.QUANTIZE_DEFAULTS == dataclasses.asdict(QuantizeOptions())
