"""`registry merge` against peft's own merge_and_unload on tiny models, plus lineage, dedup and refusals."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import cli_json, run_cli
from tinymodel import build_tiny_llama

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _quiet():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def make_peft_adapter(base_dir: Path, out: Path, dtype=torch.float32, seed: int = 1, **lora) -> Path:
    """A peft LoRA adapter for the model in base_dir, with non-zero lora_B so the merge changes something."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    _quiet()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    lora.setdefault("init_lora_weights", False)
    get_peft_model(model, LoraConfig(**lora)).save_pretrained(out)
    return out


def peft_reference(base_dir: Path, adapter_dir: Path, dtype) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _quiet()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype), adapter_dir)
    return {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}


def merged_tensors(name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    folder = Path(run_cli("path", name).stdout.strip())
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    return tensors


def assert_matches_peft(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert ours, "no tensors merged"
    for key, tensor in ours.items():
        expected = ref[key]
        assert tensor.dtype == expected.dtype and tensor.shape == expected.shape, key
        if tensor.dtype == torch.float32:
            assert (tensor - expected).abs().max().item() <= 1e-6, key
        else:  # bf16/fp16: identical, or one unit in the last place
            a, b = tensor.view(torch.int16).int(), expected.view(torch.int16).int()
            assert (a - b).abs().max().item() <= 1, key


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Tiny bases: Llama in fp32, the same in bf16, Llama in several shards, and a GPT-2 (Conv1D layers)."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    _quiet()
    root = tmp_path_factory.mktemp("bases")
    llama = build_tiny_llama(root / "llama", seed=0)
    bf16 = root / "llama-bf16"
    AutoModelForCausalLM.from_pretrained(llama).to(torch.bfloat16).save_pretrained(bf16)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (bf16 / f).write_bytes((llama / f).read_bytes())
    sharded = build_tiny_llama(root / "llama-sharded", seed=0, shards=3)
    torch.manual_seed(0)
    gpt2 = root / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=320, n_embd=64, n_layer=2, n_head=4, n_positions=64)).save_pretrained(gpt2)
    return {"llama": llama, "bf16": bf16, "sharded": sharded, "gpt2": gpt2}


CASES = {
    "all-linear": ("llama", torch.float32, dict(r=4, lora_alpha=8, target_modules=LINEAR)),
    "lm_head": ("llama", torch.float32, dict(r=4, lora_alpha=16, target_modules=["q_proj", "lm_head"])),
    "rslora": ("llama", torch.float32, dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["v_proj", "up_proj"])),
    "patterns": ("llama", torch.float32, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                              rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 6},
                                              alpha_pattern={"down_proj": 32})),
    "modules_to_save": ("llama", torch.float32, dict(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                     modules_to_save=["lm_head"])),
    "embedding": ("llama", torch.float32, dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "o_proj"])),
    "dora": ("llama", torch.float32, dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "gate_proj"])),
    "bf16": ("bf16", torch.bfloat16, dict(r=4, lora_alpha=8, target_modules=LINEAR)),
    "bf16-dora": ("bf16", torch.bfloat16, dict(r=4, lora_alpha=8, use_dora=True, target_modules=["k_proj"])),
    "gpt2-fan-in-fan-out": ("gpt2", torch.float32, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                                                        fan_in_fan_out=True)),
    "sharded": ("sharded", torch.float32, dict(r=4, lora_alpha=8, target_modules=LINEAR)),
}


@pytest.mark.sqlite_only  # numerics, 11 cases: the catalog side of merge runs on both backends below
@pytest.mark.parametrize("case", list(CASES))
def test_merge_equals_peft(home, bases, tmp_path, case):
    base_key, dtype, lora = CASES[case]
    base_dir = bases[base_key]
    adapter = make_peft_adapter(base_dir, tmp_path / "adapter", dtype, **lora)
    if lora.get("modules_to_save"):
        _train_saved_modules(adapter)
    run_cli("import", str(base_dir), "--name", "base")
    run_cli("import", str(adapter), "--name", "lora")
    out = cli_json("merge", "base", "lora", "--name", "merged")
    ref = peft_reference(base_dir, adapter, dtype)
    ours = merged_tensors("merged")
    assert_matches_peft(ours, ref)
    base_tensors = merged_tensors("base")
    changed = {k for k in ours if not torch.equal(ours[k], base_tensors[k])}
    assert len(changed) == out["tensors_merged"] + out["tensors_replaced"] > 0
    if case == "sharded":
        shards = sorted(p.name for p in base_dir.glob("*.safetensors"))
        assert len(shards) > 1
        assert sorted(p.name for p in Path(run_cli("path", "merged").stdout.strip()).glob("*.safetensors")) == shards
        assert "model.safetensors.index.json" in {f["path"] for f in cli_json("show", "merged")["file_list"]}


def _train_saved_modules(adapter: Path) -> None:
    """Stand-in for training: change the saved copies of modules_to_save so replacing them shows."""
    from safetensors.torch import load_file, save_file

    path = adapter / "adapter_model.safetensors"
    tensors = load_file(str(path))
    for key in tensors:
        if "lora_" not in key:
            tensors[key] = tensors[key] + 0.01
    save_file(tensors, str(path))


def test_merge_lineage_metadata_and_dedup(home, bases, tmp_path):
    base_dir = bases["llama"]
    adapter = make_peft_adapter(base_dir, tmp_path / "adapter", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    base = cli_json("import", str(base_dir), "--name", "base")
    lora = cli_json("import", str(adapter), "--name", "lora")
    out = cli_json("merge", "base", "lora")
    assert out["name"] == "lora-merged"
    weights = (base_dir / "model.safetensors").stat().st_size
    assert out["bytes_added"] == weights  # config, tokenizer and generation files reuse the base's blobs
    shown = cli_json("show", "lora-merged")
    assert shown["kind"] == "merged"
    assert sorted((p["name"], p["role"]) for p in shown["lineage"]["parents"]) == [("base", "base"), ("lora", "adapter")]
    assert "merge" not in shown["metadata"]  # how it was made is provenance, not part of the digest
    m = shown["provenance"]["merge"]
    assert (m["base_digest"], m["adapter_digest"]) == (base["digest"], lora["digest"])
    assert (m["r"], m["lora_alpha"], m["scaling"], m["use_rslora"]) == (8, 16, 2.0, False)
    assert sorted(m["target_modules"]) == ["q_proj", "v_proj"] and m["versions"]["peft"]
    base_files = {f["path"]: f["sha256"] for f in cli_json("show", "base")["file_list"]}
    merged_files = {f["path"]: f["sha256"] for f in shown["file_list"]}
    assert merged_files.keys() == base_files.keys()
    assert [p for p in base_files if base_files[p] != merged_files[p]] == ["model.safetensors"]
    again = cli_json("merge", "base", "lora")
    assert again["digest"] == out["digest"] and again["bytes_added"] == 0
    assert "used by: lora-merged (base" in run_cli("show", "base").stdout


def test_merge_check_and_dtype(home, bases, tmp_path):
    adapter = make_peft_adapter(bases["llama"], tmp_path / "adapter", r=4, lora_alpha=8, target_modules=LINEAR)
    run_cli("import", str(bases["llama"]), "--name", "base")
    run_cli("import", str(adapter), "--name", "lora")
    out = run_cli("merge", "base", "lora", "--check", "--dtype", "bf16", "--name", "m16").stdout
    assert "largest logit difference against peft" in out
    shown = cli_json("show", "m16")
    assert shown["metadata"]["dtype"] == "bfloat16" and shown["provenance"]["merge"]["check"]["max_logit_diff"] < 0.1
    assert json.loads((Path(run_cli("path", "m16").stdout.strip()) / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in merged_tensors("m16").values()} == {torch.bfloat16}
    out32 = cli_json("merge", "base", "lora", "--check", "--name", "m32")
    assert out32["check"]["max_logit_diff"] < 1e-4


def _error(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


# Refusals come before any registration; merge's catalog side runs on both backends in the lineage, dtype and
# pins tests.
@pytest.mark.sqlite_only
def test_refusals(home, bases, tmp_path):
    from safetensors.torch import load_file, save_file

    llama, gpt2 = bases["llama"], bases["gpt2"]
    run_cli("import", str(llama), "--name", "base")
    good = make_peft_adapter(llama, tmp_path / "good", r=4, lora_alpha=8, target_modules=["q_proj"])
    run_cli("import", str(good), "--name", "good")
    # The adapter names another base model.
    other = make_peft_adapter(gpt2, tmp_path / "gpt2-lora", r=4, lora_alpha=8, target_modules=["c_attn"],
                              fan_in_fan_out=True)
    run_cli("import", str(other), "--name", "gpt2-lora")
    assert "was trained on" in _error(run_cli("merge", "base", "gpt2-lora", check=2))
    # A targeted tensor the base lacks: refused even with --force.
    assert "which the base does not have" in _error(run_cli("merge", "base", "gpt2-lora", "--force", check=2))
    # A shape that does not fit.
    small = build_tiny_llama(tmp_path / "small-llama", seed=0)
    cfg = json.loads((small / "config.json").read_text())
    from transformers import LlamaConfig, LlamaForCausalLM

    narrow = tmp_path / "narrow"
    LlamaForCausalLM(LlamaConfig(**{**cfg, "hidden_size": 32, "intermediate_size": 64,
                                    "head_dim": 8})).save_pretrained(narrow)
    shaped = make_peft_adapter(narrow, tmp_path / "narrow-lora", r=4, lora_alpha=8, target_modules=["q_proj"])
    run_cli("import", str(shaped), "--name", "narrow-lora")
    err = _error(run_cli("merge", "base", "narrow-lora", "--force", check=2))
    assert "shape mismatch for model.layers.0.self_attn.q_proj.weight" in err and "[64, 64]" in err
    # An unknown key.
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    tensors = load_file(str(good / "adapter_model.safetensors"))
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight"] = torch.zeros(2)
    save_file(tensors, str(odd / "adapter_model.safetensors"))
    run_cli("import", str(odd), "--name", "odd", "--base", "base")
    assert "unknown tensor 'base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight'" in \
        _error(run_cli("merge", "base", "odd", check=2))
    # Another peft method.
    ia3 = tmp_path / "ia3"
    ia3.mkdir()
    (ia3 / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "base_model_name_or_path": str(llama)}))
    save_file({"base_model.model.model.layers.0.mlp.down_proj.ia3_l": torch.ones(1, 128)},
              str(ia3 / "adapter_model.safetensors"))
    run_cli("import", str(ia3), "--name", "ia3")
    assert "peft method 'IA3' is not supported" in _error(run_cli("merge", "base", "ia3", check=2))
    # An untrained adapter (lora_B all zeros) would give back the base.
    zero = make_peft_adapter(llama, tmp_path / "zero", r=4, lora_alpha=8, target_modules=["q_proj"],
                             init_lora_weights=True)
    run_cli("import", str(zero), "--name", "zero")
    assert "merged model equals its base" in _error(run_cli("merge", "base", "zero", check=1))
    # Pickle adapters need --allow-pickle.
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    torch.save(load_file(str(good / "adapter_model.safetensors")), pickled / "adapter_model.bin")
    run_cli("import", str(pickled), "--name", "pickled")
    assert "--allow-pickle" in _error(run_cli("merge", "base", "pickled", check=2))
    run_cli("merge", "base", "pickled", "--allow-pickle", "--name", "from-pickle")
    run_cli("merge", "base", "good", "--name", "from-safetensors")
    weights = [{f["path"]: f["sha256"] for f in cli_json("show", n)["file_list"]}["model.safetensors"]
               for n in ("from-pickle", "from-safetensors")]
    assert weights[0] == weights[1]  # the same adapter, read from pickle or safetensors, merges identically
    # Wrong argument kinds and a quantized base.
    assert "not an adapter" in _error(run_cli("merge", "base", "base", check=2))
    assert "is an adapter" in _error(run_cli("merge", "good", "good", check=2))
    quant = tmp_path / "quant"
    quant.mkdir()
    for f in llama.iterdir():
        (quant / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((llama / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (quant / "config.json").write_text(json.dumps(cfg))
    run_cli("import", str(quant), "--name", "quant")
    assert "is quantized; merge into the full-precision base" in _error(run_cli("merge", "quant", "good", check=2))
    assert [a["name"] for a in cli_json("list", "--kind", "merged")] == ["from-safetensors", "from-pickle"]


def test_merge_that_registers_nothing_leaves_no_pins(home, bases, tmp_path):
    # The merge writes its shards into the store (pinned, so gc keeps them), then its name is refused at
    # registration: when the job ends its pins go too, so the next gc may free the unregistered shards.
    from registry import Registry
    from registry.models import BlobPin

    adapter = make_peft_adapter(bases["llama"], tmp_path / "adapter", r=4, target_modules=["q_proj"])
    run_cli("import", str(bases["llama"]), "--name", "base")
    run_cli("import", str(adapter), "--name", "lora", "--base", "base")
    proc = run_cli("merge", "base", "lora", "--name", "base", check=2)
    assert "already used" in proc.stderr
    reg = Registry()
    with reg.session() as s:
        assert s.query(BlobPin).count() == 0
