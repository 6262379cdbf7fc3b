#!/usr/bin/env bash
# GPU check for `registry quantize --device cuda`: generate a Llama of about 1B parameters, quantize it to GPTQ
# int4 on the GPU, and print wall time, peak GPU memory and the perplexity pair.
#
# The GPU machine has Python 3.12, torch 2.11 and transformers 5.17 but no gptqmodel and no network, so the
# wheels travel with the working tree:
#   1. here (with network):   bash bench/quantize_gpu.sh prepare      # fills .whl/ (git-ignored)
#   2. on the GPU machine:    bash bench/quantize_gpu.sh run          # carry .whl along
# On Hopper the default GPTQ kernel fetches CUTLASS at first use; the script selects the torch kernel instead
# (REGISTRY_GPTQ_BACKEND=gptq_torch) for loading the quantized model in the evaluation.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-run}" in
prepare)
  bash ../shared/gpu/prepare-wheels.sh .whl
  # The registry's own pure-Python dependencies that the GPU image lacks.
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl \
    sqlalchemy alembic mako platformdirs rich markdown-it-py mdurl pygments click httpx httpcore h11 anyio sniffio
  du -sh .whl
  ;;
run)
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD/.whl/shim:$PWD
  export REGISTRY_GPTQ_BACKEND=${REGISTRY_GPTQ_BACKEND:-gptq_torch} GPTQMODEL_CPU_WORKERS=8
  work=${WORK:-/tmp/registry-gpu}
  rm -rf "$work" && mkdir -p "$work"
  python3 - "$work" <<'PY'
import sys
from pathlib import Path
import torch
sys.path.insert(0, "tests")
from tinymodel import build_tokenizer, synthetic_corpus
from transformers import LlamaConfig, LlamaForCausalLM
work = Path(sys.argv[1])
torch.manual_seed(0)
config = LlamaConfig(vocab_size=320, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                     num_attention_heads=32, num_key_value_heads=4, dtype="bfloat16")
model = LlamaForCausalLM(config).to(torch.bfloat16)
print(f"generated Llama with {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters", flush=True)
model.save_pretrained(work / "model")
build_tokenizer(work / "model")
(work / "calibration.txt").write_text("\n\n".join(synthetic_corpus(600)) + "\n")
PY
  export REGISTRY_HOME=$work/home
  python3 -m registry import "$work/model" --name src --link
  peak_file=$work/gpu-peak
  ( peak=0; while true; do
      used=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -n1)
      [ "$used" -gt "$peak" ] && peak=$used && echo "$peak" > "$peak_file"
      sleep 0.2
    done ) &
  sampler=$!
  start=$(date +%s.%N)
  python3 -m registry quantize src --device cuda --calibration "$work/calibration.txt" --samples 128 \
    --seq-len 512 --json > "$work/result.json"
  end=$(date +%s.%N)
  kill $sampler
  python3 - "$work" "$start" "$end" <<'PY'
import json, sys
from pathlib import Path
work, start, end = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
r = json.loads((work / "result.json").read_text())
e = r["evaluation"]
print(f"quantize --device cuda: {end - start:.1f} s wall (incl. evaluation), peak GPU memory "
      f"{int((work / 'gpu-peak').read_text()) / 1024:.1f} GiB")
print(f"perplexity: source {e['perplexity_source']}, int4 {e['perplexity_quantized']} "
      f"({e['perplexity_ratio']}x); weights {e['size_reduction'] * 100:.0f}% smaller; digest {r['digest']}")
PY
  ;;
*) echo "usage: bash bench/quantize_gpu.sh prepare|run" >&2; exit 2 ;;
esac
