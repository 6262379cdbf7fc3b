"""Benchmark: `registry quantize --no-eval` against direct GPTQModel calls (load, quantize, save) on the same
model and calibration, each as its own process, in the same run. Target: the registry adds at most 5%.

    python bench/quantize.py [--hidden 1024] [--layers 8] [--samples 64] [--out bench/out]
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

DIRECT = """
import sys
from gptqmodel import GPTQModel, QuantizeConfig
from transformers import AutoTokenizer
from registry.calibration import load_calibration
src, out, samples, seq_len = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
tok = AutoTokenizer.from_pretrained(src)
calib = load_calibration(sys.argv[5], samples, 0)
batches = [dict(tok(t, truncation=True, max_length=seq_len)) for t in calib.samples]
model = GPTQModel.load(src, QuantizeConfig(bits=4, group_size=128, desc_act=False, sym=True), device="cpu")
model.quantize([{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]} for b in batches], batch_size=1)
model.save(out)
"""


def make_model(folder: Path, hidden: int, layers: int) -> None:
    import torch
    from tinymodel import build_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").exists():
        return
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=320, hidden_size=hidden, intermediate_size=int(hidden * 2.75),
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64)
    LlamaForCausalLM(config).save_pretrained(folder)
    build_tokenizer(folder)


def timed(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{cmd[:3]} failed: {proc.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = parser.parse_args()
    work = args.out / "quantize"
    model = work / "model"
    make_model(model, args.hidden, args.layers)
    calibration = work / "calibration.txt"
    from tinymodel import synthetic_corpus

    calibration.write_text("\n\n".join(synthetic_corpus(4 * args.samples)) + "\n")
    home = work / "home"
    shutil.rmtree(home, ignore_errors=True)
    shutil.rmtree(work / "direct-out", ignore_errors=True)
    env = {**os.environ, "REGISTRY_HOME": str(home), "GPTQMODEL_CPU_WORKERS": str(os.cpu_count())}
    env.pop("REGISTRY_DATABASE_URL", None)
    registry = str(Path(sys.executable).parent / "registry")
    subprocess.run([registry, "import", str(model), "--name", "src", "--link"], env=env, check=True, capture_output=True)
    direct = timed([sys.executable, "-c", DIRECT, str(model), str(work / "direct-out"), str(args.samples),
                    str(args.seq_len), str(calibration)], env)
    ours = timed([registry, "quantize", "src", "--no-eval", "--device", "cpu", "--calibration", str(calibration),
                  "--samples", str(args.samples), "--seq-len", str(args.seq_len)], env)
    params = sum(p.stat().st_size for p in model.glob("*.safetensors")) / 4 / 1e6
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"model: Llama hidden {args.hidden}, {args.layers} layers, {params:.0f}M parameters fp32; "
          f"{args.samples} calibration samples of at most {args.seq_len} tokens; CPU")
    print(f"  direct GPTQModel (load, quantize, save): {direct:7.1f} s")
    print(f"  registry quantize --no-eval           : {ours:7.1f} s")
    print(f"registry overhead: {(ours / direct - 1) * 100:+.1f}% (target <= +5%)")


if __name__ == "__main__":
    main()
