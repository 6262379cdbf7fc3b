"""Benchmark: `registry verify` against sha256sum, openssl dgst and a sequential hashlib loop.

    python bench/verify.py [--shards 4] [--shard-mb 512] [--out bench/out]

Generates a model of N safetensors shards of random data, imports it with --link (no copy), then times
each hasher over the same files in the same run (warm page cache for all) and prints GB/s and ratios.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_shards(folder: Path, shards: int, shard_bytes: int) -> list[Path]:
    """Write `shards` safetensors files of random U8 data (reused if already there)."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    rng = np.random.default_rng(0)
    paths = []
    for i in range(shards):
        path = folder / f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        header = json.dumps({f"w{i}": {"dtype": "U8", "shape": [shard_bytes], "data_offsets": [0, shard_bytes]}})
        raw = header.encode()
        if not path.exists() or path.stat().st_size != 8 + len(raw) + shard_bytes:
            with open(path, "wb") as f:
                f.write(struct.pack("<Q", len(raw)) + raw)
                for _ in range(shard_bytes // (64 << 20)):
                    f.write(rng.integers(0, 256, 64 << 20, dtype=np.uint8).tobytes())
                f.write(rng.integers(0, 256, shard_bytes % (64 << 20), dtype=np.uint8).tobytes())
        paths.append(path)
    return paths


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def best_of(n: int, fn) -> float:
    return min(timed(fn) for _ in range(n))


def sequential_hashlib(paths: list[Path]) -> None:
    """What `hf cache verify` does: one file after another, 1 MiB chunks."""
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--shard-mb", type=int, default=512)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    from registry import Registry
    from registry.db import dispose_all
    from registry.importer import import_folder
    from registry.verify import verify

    model = args.out / "verify-model"
    paths = make_shards(model, args.shards, args.shard_mb << 20)
    total = sum(p.stat().st_size for p in paths) + (model / "config.json").stat().st_size
    home = args.out / "verify-home"
    env = {**os.environ, "REGISTRY_HOME": str(home)}
    env.pop("REGISTRY_DATABASE_URL", None)
    os.environ.update(REGISTRY_HOME=str(home))
    reg = Registry(home)
    reg.init()
    import_folder(reg, model, "bench-verify", link=True)
    registry_bin = str(Path(sys.executable).parent / "registry")
    files = [str(p) for p in paths]

    sequential_hashlib(paths)  # warm the page cache for everyone
    results = {
        "registry verify (CLI)": best_of(args.repeat, lambda: subprocess.run(
            [registry_bin, "verify", "bench-verify"], env=env, check=True, capture_output=True)),
        "registry verify (library)": best_of(args.repeat, lambda: verify(reg, ["bench-verify"])),
        "sha256sum": best_of(args.repeat, lambda: subprocess.run(["sha256sum", *files], check=True,
                                                                   capture_output=True)),
        "openssl dgst -sha256": best_of(args.repeat, lambda: subprocess.run(
            ["openssl", "dgst", "-sha256", *files], check=True, capture_output=True)),
        "sequential hashlib 1 MiB": best_of(args.repeat, lambda: sequential_hashlib(paths)),
    }
    quick_lib = best_of(5, lambda: verify(reg, ["bench-verify"], quick=True))
    quick_cli = best_of(3, lambda: subprocess.run([registry_bin, "verify", "--quick", "bench-verify"], env=env,
                                                  check=True, capture_output=True))
    cores = os.cpu_count() or 1
    gb = total / 1e9
    print(f"machine: {platform.processor() or platform.machine()}, {cores} cores, Python {platform.python_version()}")
    print(f"model: {args.shards} shards x {args.shard_mb} MiB = {gb:.2f} GB (page cache warm)")
    for name, secs in results.items():
        print(f"  {name:<28} {secs:7.3f} s  {gb / secs:6.2f} GB/s")
    reg_s = results["registry verify (library)"]
    print(f"registry vs sequential loop: {results['sequential hashlib 1 MiB'] / reg_s:.2f}x (target >= 1.8x)")
    print(f"registry per core vs openssl: {results['openssl dgst -sha256'] / reg_s / cores:.2f}x (target >= 0.9x)")
    print(f"registry CLI vs sequential loop: {results['sequential hashlib 1 MiB'] / results['registry verify (CLI)']:.2f}x")
    print(f"verify --quick: {quick_lib * 1000:.1f} ms in the library (target < 50 ms), "
          f"{quick_cli * 1000:.0f} ms for the whole CLI process")
    dispose_all()


if __name__ == "__main__":
    main()
