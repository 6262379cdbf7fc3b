"""Benchmark: start-up time of short commands (`--help`, `list`, `show`, `verify --quick`) on a small catalog.

    python bench/startup.py [--runs 15] [--out bench/out/startup] [--src DIR] [--orm]

Builds a small catalog once (three artifacts of a few small files, one tag, the default SQLite catalog in
the home), then runs each command `--runs` times as a fresh process, the way the `registry` console script
does, and prints the median and the spread (min-max) of the wall time. `--src DIR` puts another checkout
first on PYTHONPATH (its registry/ must hold workers/ and migrations/ as registry/workers and
registry/migrations, e.g. symlinks), to measure older code in the same run. `--orm` sets REGISTRY_FAST_READ=0:
the SQLAlchemy path that PostgreSQL catalogs (and a SQLite catalog that must be migrated first) take.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What the console script `registry` runs (see .venv/bin/registry); -c keeps --src usable. Commands run in the
# output folder: `-c` puts the working directory first on sys.path, and a checkout there would shadow --src.
ENTRY = "import sys; from registry.cli import main; sys.argv[0] = 'registry'; sys.exit(main())"
TARGETS = {"--help": 0.15, "list": 0.25, "show": 0.25, "verify --quick": 0.25}


def write_safetensors(path: Path, tensors: dict[str, int]) -> None:
    """A valid safetensors file of U8 tensors of the given sizes (no numpy or torch needed)."""
    header, offset = {}, 0
    for name, size in tensors.items():
        header[name] = {"dtype": "U8", "shape": [size], "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(range(256)) * (offset // 256) + b"\0" * (offset % 256))


def make_models(root: Path) -> dict[str, Path]:
    """Two small base models and an adapter of the first."""
    folders = {}
    for name, seed in (("tiny-base", 1), ("tiny-chat", 2)):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                        "torch_dtype": "float32", "seed": seed}))
        (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "seed": seed}))
        for shard in range(2):
            write_safetensors(folder / f"model-{shard + 1:05d}-of-00002.safetensors",
                              {f"layer{shard}.weight": 4096 * (seed + shard)})
        folders[name] = folder
    adapter = root / "tiny-lora"
    adapter.mkdir(parents=True, exist_ok=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                             "base_model_name_or_path": "tiny-base"}))
    write_safetensors(adapter / "adapter_model.safetensors", {"lora_A.weight": 1024, "lora_B.weight": 1024})
    folders["tiny-lora"] = adapter
    return folders


def registry(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", ENTRY, *args], env=env, check=check, capture_output=True, text=True,
                          cwd=env["REGISTRY_HOME"] + "/..")


def build_catalog(out: Path, env: dict[str, str]) -> None:
    """The small catalog every command runs on (reused when it is already there)."""
    if (out / "home" / "registry.db").exists():
        return
    folders = make_models(out / "models")
    registry(env, "init")
    registry(env, "import", str(folders["tiny-base"]), "--name", "tiny-base")
    registry(env, "import", str(folders["tiny-chat"]), "--name", "tiny-chat")
    registry(env, "import", str(folders["tiny-lora"]), "--name", "tiny-lora", "--base", "tiny-base")
    registry(env, "tag", "tiny-base", "tiny-base:prod")
    registry(env, "verify", "--all")


def time_command(env: dict[str, str], args: list[str], runs: int) -> list[float]:
    registry(env, *args)  # warm-up: page cache, bytecode caches
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", ENTRY, *args], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, cwd=env["REGISTRY_HOME"] + "/..")
        times.append(time.perf_counter() - start)
        if proc.returncode != 0:
            sys.exit(f"registry {' '.join(args)} failed ({proc.returncode}): {proc.stderr.decode()}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "startup")
    parser.add_argument("--src", type=Path, help="measure the registry package found here instead")
    parser.add_argument("--orm", action="store_true", help="without the SQLite fast path (REGISTRY_FAST_READ=0)")
    args = parser.parse_args()
    out = args.out.absolute()
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    env["REGISTRY_HOME"] = str(out / "home")
    out.mkdir(parents=True, exist_ok=True)
    build_catalog(out, env)  # always with the code under test's own tree, so the schema is the newest one
    if args.orm:
        env["REGISTRY_FAST_READ"] = "0"
    if args.src:
        env["PYTHONPATH"] = os.pathsep.join([str(args.src.absolute()), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    bare = time_command_raw(env, [sys.executable, "-c", "pass"], args.runs)
    code = subprocess.run([sys.executable, "-c", "import registry; print(registry.__file__)"], env=env, cwd=out,
                          check=True, capture_output=True, text=True).stdout.strip()
    print(f"# {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{args.runs} runs each, code: {code}{' (REGISTRY_FAST_READ=0)' if args.orm else ''}")
    print(f"bare python -c pass: median {statistics.median(bare):.3f} s")
    print("| command | median | spread (min-max) | target |")
    print("| --- | --- | --- | --- |")
    for label, cmd in (("--help", ["--help"]), ("list", ["list"]), ("show", ["show", "tiny-base"]),
                       ("verify --quick", ["verify", "--quick", "tiny-base"])):
        t = time_command(env, cmd, args.runs)
        print(f"| `registry {' '.join(cmd)}` | {statistics.median(t):.3f} s | {min(t):.3f}-{max(t):.3f} s "
              f"| < {TARGETS[label]:.2f} s |", flush=True)


def time_command_raw(env: dict[str, str], cmd: list[str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, env=env, check=True)
        times.append(time.perf_counter() - start)
    return times


if __name__ == "__main__":
    main()
