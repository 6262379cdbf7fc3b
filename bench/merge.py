"""Benchmark: `registry merge` against peft (from_pretrained + merge_and_unload + save_pretrained), each in its
own process, same base and adapter, in one run: wall time, peak RSS and equality of the outputs.

    python bench/merge.py [--hidden 2048] [--layers 16] [--rank 64] [--out bench/out]

The base is a generated Llama in bf16 (about 2 GB at the defaults), the adapter r=64 on every linear layer.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PEFT_SCRIPT = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out)
"""


def make_base(folder: Path, hidden: int, layers: int) -> None:
    """Write a random bf16 Llama shard by shard, without building the model in memory."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").exists():
        return
    folder.mkdir(parents=True)
    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=int(hidden * 2.75),
                         num_hidden_layers=layers, num_attention_heads=hidden // 128,
                         num_key_value_heads=hidden // 128, tie_word_embeddings=False, dtype="bfloat16")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    config.save_pretrained(folder)
    gen = torch.Generator().manual_seed(0)
    names = list(shapes)
    groups = [names[i::4] for i in range(4)]
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: (torch.randn(shapes[n], generator=gen) * 0.02).to(torch.bfloat16) for n in group}
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update(dict.fromkeys(group, shard))
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def make_adapter(folder: Path, base: Path, rank: int) -> None:
    """A LoRA adapter in peft's format on every linear layer of the base."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    if (folder / "adapter_config.json").exists():
        return
    folder.mkdir(parents=True)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for shard in sorted(base.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for name in f.keys():
                if any(f".{t}.weight" in name for t in targets):
                    out, inp = f.get_slice(name).get_shape()
                    module = name[: -len(".weight")]
                    tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, inp, generator=gen) * 0.01
                    tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out, rank, generator=gen) * 0.01
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "base_model_name_or_path": str(base), "r": rank, "lora_alpha": 2 * rank,
        "target_modules": targets, "task_type": "CAUSAL_LM", "fan_in_fan_out": False, "bias": "none",
        "lora_dropout": 0.0, "use_rslora": False, "use_dora": False, "inference_mode": True}))


def run_measured(cmd: list[str], env: dict) -> tuple[float, float]:
    """Wall seconds and peak RSS (GiB) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd[:3]} failed: {proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024 / 1024


def compare(ours: Path, theirs: Path) -> tuple[int, int, int]:
    """(tensors, identical, within one ulp) between two folders of safetensors."""
    import torch
    from safetensors import safe_open

    def index(folder):
        return {n: s for s in folder.glob("*.safetensors") for n in safe_open(str(s), "pt").keys()}

    a, b = index(ours), index(theirs)
    same = close = 0
    for name, shard in a.items():
        with safe_open(str(shard), "pt") as fa, safe_open(str(b[name]), "pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
        if torch.equal(x, y):
            same += 1
        elif (x.view(torch.int16).int() - y.view(torch.int16).int()).abs().max() <= 1:
            close += 1
    return len(a), same, close


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = parser.parse_args()
    work = args.out / "merge"
    base, adapter = work / "base", work / "adapter"
    make_base(base, args.hidden, args.layers)
    make_adapter(adapter, base, args.rank)
    home = work / "home"
    shutil.rmtree(home, ignore_errors=True)
    shutil.rmtree(work / "peft-out", ignore_errors=True)
    env = {**os.environ, "REGISTRY_HOME": str(home)}
    env.pop("REGISTRY_DATABASE_URL", None)
    registry = str(Path(sys.executable).parent / "registry")
    subprocess.run([registry, "import", str(base), "--name", "base", "--link"], env=env, check=True,
                   capture_output=True)
    subprocess.run([registry, "import", str(adapter), "--name", "lora", "--link"], env=env, check=True,
                   capture_output=True)
    ours = run_measured([registry, "merge", "base", "lora", "--name", "merged"], env)
    theirs = run_measured([sys.executable, "-c", PEFT_SCRIPT, str(base), str(adapter), str(work / "peft-out")], env)
    merged_dir = Path(subprocess.run([registry, "path", "merged"], env=env, check=True, capture_output=True,
                                     text=True).stdout.strip())
    total, same, close = compare(merged_dir, work / "peft-out")
    size = sum(p.stat().st_size for p in base.glob("*.safetensors")) / 1e9
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"base: Llama hidden {args.hidden}, {args.layers} layers, bf16, {size:.2f} GB; adapter r={args.rank} "
          "on all linear layers")
    print(f"  registry merge: {ours[0]:7.1f} s  peak RSS {ours[1]:5.2f} GiB")
    print(f"  peft          : {theirs[0]:7.1f} s  peak RSS {theirs[1]:5.2f} GiB")
    print(f"peak RSS ratio {ours[1] / theirs[1]:.2f}x (target <= 0.25x); wall ratio {ours[0] / theirs[0]:.2f}x "
          "(target <= 1.0x)")
    print(f"outputs: {total} tensors, {same} identical, {close} within one ulp, {total - same - close} different")


if __name__ == "__main__":
    main()
