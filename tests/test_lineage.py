"""Kinds, metadata and lineage: adapters link to their bases; Hugging Face cache snapshots import with source."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from conftest import cli_json, import_here, run_cli, tag_here


def make_adapter(folder: Path, base_name: str) -> Path:
    """A LoRA adapter folder in peft's on-disk format for the tiny Llama (r=4 on q_proj and v_proj)."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    config = {"peft_type": "LORA", "base_model_name_or_path": base_name, "r": 4, "lora_alpha": 8,
              "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM", "fan_in_fan_out": False}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    tensors = {}
    for layer in range(2):
        for proj, out_dim in (("q_proj", 64), ("v_proj", 32)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(4, 64)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_dim, 4)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def test_adapter_detected_and_linked_by_base_model_name(home, tiny_model, tmp_path):
    import_here(tiny_model, "tiny")
    out = cli_json("import", str(make_adapter(tmp_path / "lora", "tiny")), "--name", "lora")
    assert out["kind"] == "adapter"
    shown = cli_json("show", "lora")
    assert shown["metadata"]["peft_config"]["r"] == 4
    assert [(p["name"], p["role"]) for p in shown["lineage"]["parents"]] == [("tiny", "base")]
    assert [(c["name"], c["role"]) for c in cli_json("show", "tiny")["lineage"]["children"]] == [("lora", "base")]
    assert "derived from: tiny (base" in run_cli("show", "lora").stdout


def test_adapter_linked_by_explicit_base(home, tiny_model, tmp_path):
    import_here(tiny_model, "tiny")
    tag_here("tiny", "tiny:prod")
    run_cli("import", str(make_adapter(tmp_path / "lora", "some/other-name")), "--name", "lora",
            "--base", "tiny:prod")
    assert cli_json("show", "lora")["lineage"]["parents"][0]["name"] == "tiny"
    proc = run_cli("import", str(make_adapter(tmp_path / "lora2", "x")), "--name", "lora2", "--base", "nope",
                   check=3)
    assert "nope" in proc.stderr


def test_adapter_without_registered_base_has_no_parent(home, tmp_path):
    run_cli("import", str(make_adapter(tmp_path / "lora", "meta-llama/Llama-2-7b-hf")), "--name", "lora")
    assert cli_json("show", "lora")["lineage"]["parents"] == []


def test_quantized_kind_detected(home, tiny_model):
    config = json.loads((tiny_model / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (tiny_model / "config.json").write_text(json.dumps(config))
    out = cli_json("import", str(tiny_model), "--name", "tiny-gptq")
    assert out["kind"] == "quantized"
    assert cli_json("show", "tiny-gptq")["metadata"]["quantization_config"]["bits"] == 4
    run_cli("import", str(tiny_model), "--name", "as-checkpoint", "--kind", "checkpoint")
    assert cli_json("show", "as-checkpoint")["kind"] == "checkpoint"


def _fake_hf_cache(cache: Path, repo_id: str, model: Path) -> str:
    """Lay out a model the way huggingface_hub's cache does: blobs, a snapshot of relative symlinks, refs/main."""
    import hashlib

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in model.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, repo / "blobs" / digest)
        (snap / f.name).symlink_to(os.path.join("..", "..", "blobs", digest))
    return commit


def test_import_from_hf_cache(home, tiny_model, tmp_path):
    cache = tmp_path / "hf-cache"
    commit = _fake_hf_cache(cache, "acme/tiny-llama", tiny_model)
    out = cli_json("import", "--hf-cache", "acme/tiny-llama", "--cache-dir", str(cache))
    assert out["name"] == "acme/tiny-llama" and out["files"] == 5
    shown = cli_json("show", "acme/tiny-llama")
    assert shown["source"]["repo"] == "acme/tiny-llama" and shown["source"]["revision"] == commit
    proc = run_cli("import", "--hf-cache", "acme/missing", "--cache-dir", str(cache), check=3)
    assert "not in the Hugging Face cache" in proc.stderr
    # An adapter naming the hub repo as its base links to the imported snapshot.
    run_cli("import", str(make_adapter(tmp_path / "lora", "acme/tiny-llama")), "--name", "lora")
    assert cli_json("show", "lora")["lineage"]["parents"][0]["name"] == "acme/tiny-llama"
