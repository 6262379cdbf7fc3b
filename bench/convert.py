"""Benchmark: `registry convert --to gguf --outtype q8_0 --no-eval` against llama.cpp's converter run directly
(the vendored convert_hf_to_gguf.py) on the same model, exported with `registry export`, in the same run.
Target (issue 12): the registry adds at most 5% to the wall time, evaluation excluded.

    python bench/convert.py [--hidden 1024] [--layers 8] [--runs 5] [--breakdown-runs 3] [--out bench/out]
                            [--no-eval-run]

A random Llama (float32 safetensors, SentencePiece tokenizer.model from tests/ggufmodels.py) is imported with
`--link` into a fresh REGISTRY_HOME (SQLite catalog) and exported to a folder. After one untimed warm-up of
each, the two commands run alternately (A B A B ...), each as a whole process:
- A: `registry convert src --to gguf --outtype q8_0 --no-eval --name run-I --json` (CLI start, job, snapshot,
  the converter subprocess, hashing the file into the store, registration);
- B: `python registry/_vendor/llama_cpp/convert_hf_to_gguf.py EXPORTED --outtype q8_0 --outfile X
  --model-name src`.
After each A, `registry rm run-I` and `registry gc` delete the artifact and its blob, so the next A stores a
new blob (same source and options give the same digest; the script checks that gc freed it and that the
result says created). Then --breakdown-runs A runs with the step times recorded inside the process (where the
overhead goes), each followed by a B run, and, unless --no-eval-run, one run with the evaluation on
(informational, no target).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
CONVERTER = ROOT / "registry" / "_vendor" / "llama_cpp" / "convert_hf_to_gguf.py"
TARGET = 0.05
SOURCE = "src"

# `registry convert` as the console script runs it, with timers around its steps (monkeypatched module
# attributes; the timings go to the file named by argv[1]). Used once, for the breakdown only.
STEPS = """
import json, sys, time
t0 = time.perf_counter()
out = sys.argv.pop(1)
times = {}
def timed(module, name, label):
    real = getattr(module, name)
    times[label] = 0.0  # the table lists the steps in this order
    def wrapper(*a, **k):
        start = time.perf_counter()
        try:
            return real(*a, **k)
        finally:
            times[label] = times.get(label, 0.0) + time.perf_counter() - start
    setattr(module, name, wrapper)
import registry.gguf.convert as c, registry.gguf.converter as cv, registry.gguf.vendor as v
import registry.gguf.inspect as i
timed(c, "check_source", "check_source (options, source, architecture; twice: request and job)")
timed(cv, "supported_architectures", "  of which supported_architectures (ast of the converter's modules)")
timed(v, "require_llama_cpp", "require_llama_cpp (import llama_cpp)")
timed(c, "snapshot_path", "snapshot of the source (made in the warm-up, reused)")
timed(cv, "run_converter", "converter subprocess (convert_main.py)")
timed(i, "read_gguf", "read_gguf (header)")
timed(c, "ingest_files", "ingest_files (copy + hash + fsync into the store)")
timed(c, "register_artifact", "register_artifact (catalog rows)")
timed(c, "convert", "convert() in all")
from registry.cli import main
sys.argv[0] = "registry"
t_main = time.perf_counter()
try:
    main()
except SystemExit:
    pass
finally:
    times["main() in all"] = time.perf_counter() - t_main
    times["imports before main (of the CLI and the modules timed here)"] = t_main - t0
    open(out, "w").write(json.dumps(times))
"""


def make_model(folder: Path, hidden: int, layers: int) -> None:
    """A random Llama in float32 with a SentencePiece tokenizer trained here (vocabulary 512)."""
    import torch
    from ggufmodels import build_sp_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").exists():
        return
    build_sp_tokenizer(folder)
    torch.manual_seed(0)
    intermediate = int(hidden * 2.75) // 256 * 256  # rows a multiple of q8_0's (and the K-quants') block
    config = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(folder, safe_serialization=True)


def run(cmd: list[str], env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return seconds, proc.stdout


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()


class Bench:
    def __init__(self, work: Path, env: dict):
        self.work, self.env = work, env
        self.registry = str(Path(sys.executable).parent / "registry")
        self.exported = work / "exported"
        self.direct_out = work / "direct" / f"{SOURCE}.Q8_0.gguf"

    def reg(self, *args: str) -> str:
        return run([self.registry, *args], self.env)[1]

    def convert_cmd(self, name: str, evaluate: bool = False) -> list[str]:
        return [self.registry, "convert", SOURCE, "--to", "gguf", "--outtype", "q8_0", "--name", name, "--json",
                *([] if evaluate else ["--no-eval"])]

    def ours(self, name: str, evaluate: bool = False) -> tuple[float, dict]:
        """A: the whole CLI; then the artifact and its blob are deleted (checked) so the next run stores anew.
        The result gets "file_sha256", the sha256 of the GGUF file."""
        seconds, out = run(self.convert_cmd(name, evaluate), self.env)
        result = json.loads(out)
        if not result.get("created"):
            raise SystemExit(f"registry convert did not create a new artifact: {result}")
        result["file_sha256"] = self.drop(name)
        return seconds, result

    def drop(self, name: str) -> str:
        """`registry rm` + `registry gc`, checking that gc freed the artifact's one blob; returns its sha256."""
        (blob,) = [f["sha256"] for f in json.loads(self.reg("show", name, "--json"))["file_list"]]
        self.reg("rm", name)
        freed = json.loads(self.reg("gc", "--json"))["blobs"]
        if blob not in freed:
            raise SystemExit(f"registry gc did not free {name}'s blob {blob} (freed: {freed})")
        return blob

    def direct(self) -> tuple[float, str]:
        """B: llama.cpp's converter on the exported folder (the env the registry gives it: offline)."""
        self.direct_out.parent.mkdir(parents=True, exist_ok=True)
        self.direct_out.unlink(missing_ok=True)
        seconds, _ = run([sys.executable, str(CONVERTER), str(self.exported), "--outtype", "q8_0",
                          "--outfile", str(self.direct_out), "--model-name", SOURCE], self.env)
        digest = sha256(self.direct_out)
        self.direct_out.unlink()
        return seconds, digest

    def steps(self, name: str) -> tuple[float, dict]:
        """One A run with timers inside (bench-only monkeypatching), for where the overhead goes."""
        out = self.work / "steps.json"
        cmd = self.convert_cmd(name)
        seconds, _ = run([sys.executable, "-c", STEPS, str(out), *cmd[1:]], self.env)
        self.drop(name)
        return seconds, json.loads(out.read_text())


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} s | {min(xs):.2f}-{max(xs):.2f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each command (after a warm-up)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--breakdown-runs", type=int, default=3, help="runs with timers inside (where the time goes)")
    parser.add_argument("--no-eval-run", action="store_true", help="skip the one run with the evaluation on")
    args = parser.parse_args()
    work = args.out / "convert"
    model = work / f"model-h{args.hidden}-l{args.layers}"
    make_model(model, args.hidden, args.layers)
    home = work / "home"
    for path in (home, work / "exported", work / "direct"):
        shutil.rmtree(path, ignore_errors=True)
    env = {**os.environ, "REGISTRY_HOME": str(home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    for var in ("REGISTRY_DATABASE_URL", "REGISTRY_URL", "NO_LOCAL_GGUF"):
        env.pop(var, None)  # the default SQLite catalog in the home; a local run; the converter's own gguf-py
    bench = Bench(work, env)
    bench.reg("import", str(model), "--name", SOURCE, "--link")
    bench.reg("export", SOURCE, str(bench.exported))

    load_before = os.getloadavg()
    bench.ours("warm-up")  # also makes the source's snapshot, which later runs reuse
    bench.direct()
    ours, direct, digests = [], [], set()
    for i in range(args.runs):
        seconds, result = bench.ours(f"run-{i}")
        ours.append(seconds)
        digests.add(result["file_sha256"])
        seconds, file_digest = bench.direct()
        direct.append(seconds)
    load_after = os.getloadavg()
    # The breakdown: runs with timers inside, each followed by a B run, so the converter subprocess is compared
    # with B under the same load.
    breakdown, direct_again = [], []
    for i in range(args.breakdown_runs):
        breakdown.append(bench.steps(f"steps-{i}"))
        direct_again.append(bench.direct()[0])
    evaluated = None
    if not args.no_eval_run:
        evaluated = bench.ours("evaluated", evaluate=True)

    params = sum(p.stat().st_size for p in model.glob("*.safetensors")) / 4
    gguf_size = result["size"]
    overhead = statistics.median(ours) / statistics.median(direct) - 1
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after the timed runs")
    print(f"model: random Llama, hidden {args.hidden}, {args.layers} layers, vocabulary 512 (SentencePiece), "
          f"{params / 1e6:.0f}M parameters, {params * 4 / 1e6:.0f} MB float32 safetensors -> q8_0 GGUF "
          f"{gguf_size / 1e6:.0f} MB; SQLite catalog; {args.runs} runs each, alternating, after one warm-up")
    print(f"A's file, every run: {' '.join(sorted(d[:12] for d in digests))}; B's: {file_digest[:12]}"
          + (" (the same bytes)" if digests == {file_digest} else
             " (they differ: see general.finetune in docs/benchmarks.md)"))
    print()
    print("| command | median | min-max |")
    print("| --- | --- | --- |")
    print(f"| A: `registry convert {SOURCE} --to gguf --outtype q8_0 --no-eval --json` | {spread(ours)} |")
    print(f"| B: `python convert_hf_to_gguf.py EXPORTED --outtype q8_0 --outfile X --model-name {SOURCE}` "
          f"| {spread(direct)} |")
    print()
    print(f"overhead (median A / median B - 1): {overhead * 100:+.1f}% (target <= +{TARGET * 100:.0f}%: "
          f"{'met' if overhead <= TARGET else 'MISSED'}); per pair: "
          + ", ".join(f"{(a / b - 1) * 100:+.1f}%" for a, b in zip(ours, direct)))
    print()
    if breakdown:
        print_breakdown(breakdown, direct_again)
    if evaluated is not None:
        seconds, result = evaluated
        e = result["evaluation"]
        print()
        print(f"with the evaluation on: {seconds:.2f} s ({seconds - statistics.median(ours):+.2f} s over the median "
              f"--no-eval run); perplexity ratio {e['perplexity_ratio']}, tokenizer "
              f"{e['tokenizer']['strings'] - e['tokenizer']['mismatches']} of {e['tokenizer']['strings']} strings, "
              f"greedy {e['greedy']['equal']} of {e['greedy']['tokens']} tokens")


def print_breakdown(breakdown: list[tuple[float, dict]], direct_again: list[float]) -> None:
    """Median of each step over the runs with timers, and the converter subprocess against B in the same runs."""
    converter = "converter subprocess (convert_main.py)"
    total = statistics.median(t for t, _ in breakdown)
    print()
    print(f"where A's time goes ({len(breakdown)} more A runs with timers inside, each followed by a B run; medians):")
    print("| step | seconds |")
    print("| --- | --- |")
    print(f"| A as a whole process | {total:.3f} |")
    for label in breakdown[0][1]:
        print(f"| {label} | {statistics.median(steps[label] for _, steps in breakdown):.3f} |")
    own = [t - steps[converter] for t, steps in breakdown]
    print(f"| the registry's own time (A minus the converter subprocess) | {statistics.median(own):.3f} |")
    print(f"| B in the same runs | {statistics.median(direct_again):.3f} |")
    print("| converter subprocess minus B, per pair | "
          + ", ".join(f"{steps[converter] - b:+.2f}" for (_, steps), b in zip(breakdown, direct_again)) + " |")


if __name__ == "__main__":
    main()
