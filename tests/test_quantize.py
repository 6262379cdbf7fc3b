"""`registry quantize` (GPTQModel on the CPU) and `registry generate`, on a tiny Llama trained by the tests."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REGISTRY_BIN, cli_json, import_here, run_cli
from test_merge import make_peft_adapter
from tinymodel import synthetic_corpus, train_tiny_llama

QUANT_ARGS = ["--group-size", "32", "--samples", "32", "--seq-len", "64"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Llama trained for 300 steps on a synthetic corpus, and that corpus as a calibration file."""
    root = tmp_path_factory.mktemp("trained")
    corpus = synthetic_corpus()
    model = train_tiny_llama(root / "llama", corpus)
    calibration = root / "corpus.txt"
    calibration.write_text("\n\n".join(corpus[:120]) + "\n")
    return model, calibration


@pytest.fixture
def with_source(home, trained):
    model, calibration = trained
    import_here(model, "tiny")
    return calibration


# GPTQ with the defaults (128 samples of 512 tokens, evaluated), then the checkpoint is loaded and generates:
# on SQLite. Quantize's catalog side (artifact, lineage, provenance, job) on both backends:
# test_artifact_ids.py::test_quantize_links_lineage_to_the_artifact_named.
@pytest.mark.sqlite_only
def test_quantize_produces_a_gptq_checkpoint_that_loads_and_generates(with_source):
    from importlib import resources

    from safetensors import safe_open

    # The defaults: the built-in calibration set, 128 samples of up to 512 tokens. Only the group size is
    # given, because the tiny model's 64 input features are not a multiple of the default 128.
    proc = run_cli("quantize", "tiny", "--group-size", "32", "--json")
    assert proc.stderr == ""  # the built-in set gives the default 128 samples: no warning
    out = json.loads(proc.stdout)
    assert out["name"] == "tiny-gptq-int4"
    shown = cli_json("show", "tiny-gptq-int4")
    assert shown["kind"] == "quantized"
    assert [(p["name"], p["role"]) for p in shown["lineage"]["parents"]] == [("tiny", "base")]
    folder = Path(run_cli("path", "tiny-gptq-int4").stdout.strip())
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                        "quantize_config.json", "tokenizer.json",
                                                        "tokenizer_config.json"]
    qcfg = json.loads((folder / "quantize_config.json").read_text())
    assert (qcfg["bits"], qcfg["group_size"], qcfg["desc_act"], qcfg["sym"]) == (4, 32, False, True)
    assert "offload_to_disk_path" not in json.dumps(qcfg)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        q = f.get_tensor("model.layers.0.self_attn.q_proj.qweight")
        scales = f.get_tensor("model.layers.0.self_attn.q_proj.scales")
        names = set(f.keys())
    assert str(q.dtype) == "torch.int32" and tuple(q.shape) == (64 * 4 // 32, 64)  # in*bits/32 rows, out columns
    assert tuple(scales.shape) == (64 // 32, 64)
    assert {"model.layers.0.mlp.down_proj.qzeros", "model.layers.0.mlp.down_proj.g_idx"} <= names
    meta = shown["provenance"]  # options, calibration, versions and evaluation: provenance, not in the digest
    assert "quantization" not in shown["metadata"] and "evaluation" not in shown["metadata"]
    q_meta = meta["quantization"]
    builtin = resources.files("registry").joinpath("data/calibration.jsonl").read_bytes()
    assert q_meta["calibration"] == {"digest": "sha256:" + hashlib.sha256(builtin).hexdigest(), "source": "builtin",
                                     "samples": 128, "seq_len": 512, "held_out": 50}
    assert (q_meta["seed"], q_meta["device"]) == (0, "cpu")
    assert q_meta["versions"]["gptqmodel"] == "7.6.0"
    e = meta["evaluation"]  # on built-in text the tiny model never saw: high, but equal before and after
    assert e["held_out_samples"] == 50
    assert 0.8 * e["perplexity_source"] <= e["perplexity_quantized"] <= 1.2 * e["perplexity_source"]
    assert e["size_reduction"] > 0.5
    text = run_cli("show", "tiny-gptq-int4").stdout
    assert "evaluation:      perplexity" in text and "GPTQ int4 group 32" in text
    generated = run_cli("generate", "tiny-gptq-int4", "--prompt", "The registry", "--max-new-tokens", "12").stdout
    assert len(generated.strip()) > 0
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")


@pytest.mark.sqlite_only  # two quantizations; digests do not depend on the catalog
def test_same_inputs_give_the_same_digest(with_source, tmp_path):
    # No --samples, and a corpus of 120 paragraphs: 30 held out leave 90, fewer than the default 128, so both
    # runs use those 90 with a warning; here in the foreground, then --detach'ed to a worker.
    args = ["--calibration", str(with_source), "--group-size", "32", "--seq-len", "64", "--no-eval"]
    warning = (f"warning: {with_source} gives 90 calibration samples after holding out 30 for evaluation, "
               "fewer than the default 128; using those 90")
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    proc = run_cli("quantize", "tiny", *args, "--name", "a", "--json", cwd=workdir)
    assert proc.stderr.splitlines() == [warning]  # on stderr: stdout stays one JSON document
    first = json.loads(proc.stdout)
    assert list(workdir.iterdir()) == []  # the engine's log file does not land in the user's folder
    queued = cli_json("quantize", "tiny", *args, "--name", "b", "--detach")
    run_cli("worker", "--once")
    job = cli_json("job", str(queued["job"]))
    assert job["state"] == "succeeded" and job["params"]["options"]["samples"] is None
    second = job["result"]
    assert first["digest"] == second["digest"] and first["evaluation"] is None
    for result in (first, second):
        assert result["provenance"]["quantization"]["calibration"]["samples"] == 90
        assert result["warnings"] == [warning.removeprefix("warning: ")]


@pytest.mark.sqlite_only  # a third quantization; the failure path is the same on both
def test_perplexity_gate_registers_nothing(with_source):
    proc = run_cli("quantize", "tiny", "--calibration", str(with_source), *QUANT_ARGS, "--max-ppl-ratio", "0.5",
                   check=1)
    assert "above --max-ppl-ratio 0.5; nothing was registered" in proc.stderr
    source_ppl = float(proc.stderr.split("the source's ")[1].split(",")[0])
    assert source_ppl < 50  # evaluated on held-out corpus text, which the tiny model really learned
    assert cli_json("list", "--kind", "quantized") == []


@pytest.mark.sqlite_only  # generation reads no catalog beyond resolving the ref
def test_generate_streams_tokens_as_they_come(with_source):
    proc = subprocess.Popen([REGISTRY_BIN, "generate", "tiny", "--prompt", "The store", "--max-new-tokens", "200"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    first = os.read(proc.stdout.fileno(), 1)
    still_running = proc.poll() is None
    rest = proc.stdout.read()
    proc.wait()
    assert first and still_running, "the first token should reach stdout while generation goes on"
    assert len(rest) > 20


def test_chat_prompt_and_calibration_formats(tmp_path):
    from registry.calibration import load_calibration
    from registry.generate import chat_prompt

    class NoTemplate:
        chat_template = None

    assert chat_prompt(NoTemplate(), "hi") == "<s>Human: hi\n</s><s>Assistant: "
    jsonl = tmp_path / "chats.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in [
        {"conversations": [{"from": "human", "value": "Hello?"}, {"from": "gpt", "value": "Hi."}]},
        {"text": "plain text sample"}, {"conversations": [{"role": "user", "content": "Q"},
                                                          {"role": "assistant", "content": "A"}]}]))
    calib = load_calibration(jsonl, samples=2, seed=0, held_out_fraction=0.3)
    everything = set(calib.samples) | set(calib.held_out)
    assert "<s>Human: Hello?\n</s><s>Assistant: Hi.\n</s>" in everything and "plain text sample" in everything
    assert not set(calib.samples) & set(calib.held_out)
    builtin = load_calibration(None, samples=4, seed=0)
    assert builtin.source == "builtin" and any("<s>Human:" in t for t in builtin.samples + builtin.held_out)


# Refusals are decided before any database work that differs between backends; quantize's catalog side runs
# on both in test_artifact_ids.py::test_quantize_links_lineage_to_the_artifact_named. One refusal runs as a command
# (one line on stderr, exit 2; more: test_names_early, test_artifact_ids); the others are the same library call
# in this process, which loads torch and GPTQModel once instead of once per refusal.
@pytest.mark.sqlite_only
def test_bad_inputs(with_source, tmp_path, trained):
    from registry import Registry
    from registry.errors import BadInput
    from registry.importer import import_folder
    from registry.quantize import QuantizeOptions, quantize

    reg = Registry()
    small = dict(group_size=32, samples=32, seq_len=64)

    def refused(ref, message, **options):
        with pytest.raises(BadInput) as caught:
            quantize(reg, ref, QuantizeOptions(**options))
        assert message in str(caught.value)

    calib = str(with_source)
    proc = run_cli("quantize", "tiny", "--device", "cuda", "--calibration", calib, *QUANT_ARGS, check=2)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no CUDA GPU" in lines[0], proc.stderr
    refused("tiny", "--bits 5 is not supported", bits=5, **small, calibration=calib)
    refused("tiny", "--group-size 48 does not divide the", group_size=48, calibration=calib, samples=4)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    refused("tiny", "has no samples", **small, calibration=str(empty))
    refused("tiny", "fewer than --samples 5000", group_size=32, calibration=calib, samples=5000)
    refused("tiny", "cannot read calibration file", **small, calibration=str(tmp_path / "missing.txt"))
    adapter = make_peft_adapter(trained[0], tmp_path / "lora", r=4, lora_alpha=8, target_modules=["q_proj"])
    import_folder(reg, adapter, "lora")
    refused("lora", "merge it into its base first", **small)
    odd = tmp_path / "odd"
    shutil.copytree(trained[0], odd)
    cfg = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**cfg, "model_type": "madeupformer"}))
    import_folder(reg, odd, "odd")
    refused("odd", "architecture 'madeupformer' is not supported", **small)
    quant = tmp_path / "quant"
    shutil.copytree(trained[0], quant)
    (quant / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "gptq", "bits": 4}}))
    import_folder(reg, quant, "already")
    refused("already", "already quantized", **small)
    assert [a["name"] for a in cli_json("list", "--kind", "quantized")] == ["already"]
