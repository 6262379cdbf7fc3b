"""`registry merge` against peft's own merge_and_unload on tiny models, plus lineage, dedup and refusals."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import cli_json, import_here, run_cli, tag_here
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
    return tensors_in(Path(run_cli("path", name).stdout.strip()))


def tensors_in(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

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


# Numerics, 11 cases: the merge runs in this process (library calls), on SQLite; the same merge as a command,
# a job, its output and its catalog side run on both backends in test_merge_lineage_metadata_and_dedup and
# test_merge_that_registers_nothing_leaves_no_pins (and in test_content_digest, test_artifact_ids).
@pytest.mark.sqlite_only
@pytest.mark.parametrize("case", list(CASES))
def test_merge_equals_peft(reg, bases, tmp_path, case):
    from registry.export import snapshot_path
    from registry.importer import import_folder
    from registry.merge import merge

    base_key, dtype, lora = CASES[case]
    base_dir = bases[base_key]
    adapter = make_peft_adapter(base_dir, tmp_path / "adapter", dtype, **lora)
    if lora.get("modules_to_save"):
        _train_saved_modules(adapter)
    import_folder(reg, base_dir, "base")
    import_folder(reg, adapter, "lora")
    out = merge(reg, "base", "lora", name="merged")
    ref = peft_reference(base_dir, adapter, dtype)
    merged_dir = snapshot_path(reg, "merged")
    ours = tensors_in(merged_dir)
    assert_matches_peft(ours, ref)
    base_tensors = tensors_in(snapshot_path(reg, "base"))
    changed = {k for k in ours if not torch.equal(ours[k], base_tensors[k])}
    assert len(changed) == out.tensors_merged + out.tensors_replaced > 0
    if case == "sharded":
        shards = sorted(p.name for p in base_dir.glob("*.safetensors"))
        assert len(shards) > 1
        assert sorted(p.name for p in merged_dir.glob("*.safetensors")) == shards
        assert (merged_dir / "model.safetensors.index.json").is_file()


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
    base = import_here(base_dir, "base")
    lora = import_here(adapter, "lora")
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
    from registry import Registry
    from registry.merge import merge

    again = merge(Registry(), "base", "lora")  # the library call: a command would load torch again (seconds)
    assert again.digest == out["digest"] and again.bytes_added == 0 and again.created is False
    assert "used by: lora-merged (base" in run_cli("show", "base").stdout


# --check as a command loads peft and transformers (seconds): on SQLite. Its provenance on both backends:
# test_content_digest.py::test_merge_with_and_without_check_has_one_digest.
@pytest.mark.sqlite_only
def test_merge_check_and_dtype(home, bases, tmp_path):
    from registry import Registry
    from registry.merge import merge

    adapter = make_peft_adapter(bases["llama"], tmp_path / "adapter", r=4, lora_alpha=8, target_modules=LINEAR)
    import_here(bases["llama"], "base")
    import_here(adapter, "lora")
    out = run_cli("merge", "base", "lora", "--check", "--dtype", "bf16", "--name", "m16").stdout
    assert "largest logit difference against peft" in out
    shown = cli_json("show", "m16")
    assert shown["metadata"]["dtype"] == "bfloat16" and shown["provenance"]["merge"]["check"]["max_logit_diff"] < 0.1
    assert json.loads((Path(run_cli("path", "m16").stdout.strip()) / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in merged_tensors("m16").values()} == {torch.bfloat16}
    out32 = merge(Registry(), "base", "lora", name="m32", check=True)  # numerics only: in this process
    assert out32.check["max_logit_diff"] < 1e-4


def _error(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


# Refusals come before any registration; merge's catalog side runs on both backends in the lineage and pins
# tests. One refusal that needs the adapter's tensors runs as a command (one line, exit 2, after torch loads);
# the others are the same library call in this process, where torch loads once. The refusals the catalog
# decides are run as commands in test_refusals_the_catalog_decides_come_before_torch_is_imported.
@pytest.mark.sqlite_only
def test_refusals(reg, bases, tmp_path):
    from safetensors.torch import load_file, save_file

    from registry.errors import BadInput, Conflict, OperationFailed
    from registry.importer import import_folder
    from registry.merge import merge

    def refused(base: str, adapter: str, error=BadInput, **kw) -> str:
        with pytest.raises(error) as caught:
            merge(reg, base, adapter, **kw)
        return str(caught.value)

    llama, gpt2 = bases["llama"], bases["gpt2"]
    import_folder(reg, llama, "base")
    good = make_peft_adapter(llama, tmp_path / "good", r=4, lora_alpha=8, target_modules=["q_proj"])
    import_folder(reg, good, "good")
    # The adapter names another base model.
    other = make_peft_adapter(gpt2, tmp_path / "gpt2-lora", r=4, lora_alpha=8, target_modules=["c_attn"],
                              fan_in_fan_out=True)
    import_folder(reg, other, "gpt2-lora")
    assert "was trained on" in refused("base", "gpt2-lora", Conflict)
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
    import_folder(reg, shaped, "narrow-lora")
    err = refused("base", "narrow-lora", force=True)
    assert "shape mismatch for model.layers.0.self_attn.q_proj.weight" in err and "[64, 64]" in err
    # An unknown key.
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    tensors = load_file(str(good / "adapter_model.safetensors"))
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight"] = torch.zeros(2)
    save_file(tensors, str(odd / "adapter_model.safetensors"))
    import_folder(reg, odd, "odd", base="base")
    assert "unknown tensor 'base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight'" in refused("base", "odd")
    # Another peft method.
    ia3 = tmp_path / "ia3"
    ia3.mkdir()
    (ia3 / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "base_model_name_or_path": str(llama)}))
    save_file({"base_model.model.model.layers.0.mlp.down_proj.ia3_l": torch.ones(1, 128)},
              str(ia3 / "adapter_model.safetensors"))
    import_folder(reg, ia3, "ia3")
    assert "peft method 'IA3' is not supported" in refused("base", "ia3")
    # An untrained adapter (lora_B all zeros) would give back the base: the merge fails (exit 1).
    zero = make_peft_adapter(llama, tmp_path / "zero", r=4, lora_alpha=8, target_modules=["q_proj"],
                             init_lora_weights=True)
    import_folder(reg, zero, "zero")
    assert "merged model equals its base" in refused("base", "zero", OperationFailed)
    # Pickle adapters need --allow-pickle.
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    torch.save(load_file(str(good / "adapter_model.safetensors")), pickled / "adapter_model.bin")
    import_folder(reg, pickled, "pickled")
    assert "--allow-pickle" in refused("base", "pickled")
    from_pickle = merge(reg, "base", "pickled", name="from-pickle", allow_pickle=True)
    from_safetensors = merge(reg, "base", "good", name="from-safetensors")
    assert from_pickle.digest == from_safetensors.digest  # one adapter, from pickle or safetensors: one merge
    # Wrong argument kinds and a quantized base.
    assert "not an adapter" in refused("base", "base")
    assert "is an adapter" in refused("good", "good")
    quant = tmp_path / "quant"
    quant.mkdir()
    for f in llama.iterdir():
        (quant / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((llama / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (quant / "config.json").write_text(json.dumps(cfg))
    import_folder(reg, quant, "quant")
    assert "is quantized; merge into the full-precision base" in refused("quant", "good")
    assert [a["name"] for a in cli_json("list", "--kind", "merged")] == ["from-safetensors", "from-pickle"]


# Runs `registry merge` as the console script does, and says afterwards which ML packages it imported.
ML_IMPORTED = ("import sys\nsys.argv = ['registry', *sys.argv[1:]]\nfrom registry.cli import main\ntry:\n"
               "    main()\nfinally:\n    print('ML imported:', [m for m in ('torch', 'transformers', 'peft') "
               "if m in sys.modules], file=sys.stderr)\n")


@pytest.mark.sqlite_only  # import timing; these refusals on PostgreSQL: test_names_early, test_artifact_ids
def test_refusals_the_catalog_decides_come_before_torch_is_imported(home, tiny_model, tmp_path):
    """A merge refused for its refs, kinds, base or name answers in about a second: it never imports torch."""
    from test_lineage import make_adapter

    import_here(tiny_model, "tiny")
    import_here(make_adapter(tmp_path / "lora", "tiny"), "lora")
    import_here(make_adapter(tmp_path / "other", "someone/else"), "other")
    tag_here("tiny", "prod")
    for args, code, message in ((["tiny", "nope"], 3, "nope"), (["tiny", "tiny"], 2, "tiny is a base, not an adapter"),
                                (["tiny", "other"], 2, "other was trained on 'someone/else', not tiny"),
                                (["tiny", "lora", "--name", "prod"], 2, "'prod' is already a tag")):
        proc = subprocess.run([sys.executable, "-c", ML_IMPORTED, "merge", *args], capture_output=True, text=True)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == code and len(lines) == 2, (args, proc.stderr)
        assert lines[0].startswith("error: ") and message in lines[0], (args, proc.stderr)
        assert lines[1] == "ML imported: []", (args, proc.stderr)


def test_merge_that_registers_nothing_leaves_no_pins(home, bases, tmp_path):
    # The merge writes its shards into the store (pinned, so gc keeps them), then its name is refused at
    # registration: when the job ends its pins go too, so the next gc may free the unregistered shards.
    from registry import Registry
    from registry.models import BlobPin

    adapter = make_peft_adapter(bases["llama"], tmp_path / "adapter", r=4, target_modules=["q_proj"])
    import_here(bases["llama"], "base")
    import_here(adapter, "lora", base="base")
    proc = run_cli("merge", "base", "lora", "--name", "base", check=2)
    assert "already used" in proc.stderr
    reg = Registry()
    with reg.session() as s:
        assert s.query(BlobPin).count() == 0
