"""Benchmark: `registry pull` (verified) against huggingface_hub.snapshot_download (unverified) and
snapshot_download followed by `hf cache verify`, all from the same HF-compatible server over loopback, in one run.

    python bench/pull.py [--server fast|olah] [--shards 4] [--shard-mb 512] [--out bench/out]

--server fast (default): bench/hfserver.py, a minimal HF-compatible server that sends files with sendfile,
so the clients, not the server, set the pace. --server olah: olah in offline mode (its own venv,
.olah-venv, made by `make test-deps`) serving a git repository whose shards are LFS files; olah streams
local mirrors at about 30 MB/s, which hides every client-side cost.
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
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from hfserver import serve  # noqa: E402
from hubproxy import Olah, git  # noqa: E402
from verify import make_shards  # noqa: E402


def make_lfs_repo(mirrors: Path, shards: int, shard_mb: int) -> str:
    repo = mirrors / "models" / "bench" / "big"
    if (repo / ".git").exists():
        return "bench/big"
    repo.mkdir(parents=True)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "lfs", "install", "--local")
    git(repo, "lfs", "track", "*.safetensors")
    make_shards(repo, shards, shard_mb << 20)
    (repo / "README.md").write_text("# bench/big\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "bench model")
    for f in repo.glob("*.safetensors"):  # the work-tree copies are not needed: olah serves .git/lfs
        f.unlink()
    return "bench/big"


def timed(cmd: list[str], env: dict) -> tuple[float, int]:
    """Wall seconds and bytes the process read from block devices (/proc/PID/io read_bytes)."""
    start = time.perf_counter()
    proc = subprocess.Popen(["bash", "-c", 'exec "$@"', "x", *cmd], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    io_read = 0
    while proc.poll() is None:
        try:
            io = dict(line.split(": ") for line in Path(f"/proc/{proc.pid}/io").read_text().splitlines())
            io_read = int(io["read_bytes"])
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} failed: {err.decode()[-2000:]}")
    return time.perf_counter() - start, io_read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--shard-mb", type=int, default=512)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--server", choices=["fast", "olah"], default="fast")
    parser.add_argument("--rate", type=float, default=0, help="fast server: total MB/s, like a network link")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before `hf cache verify` "
                        "(needs root), as when a model is larger than the memory that caches it")
    args = parser.parse_args()
    work = args.out / "pull"
    if args.server == "olah":
        repo_id = make_lfs_repo(work / "mirrors", args.shards, args.shard_mb)
        server = Olah(work / "mirrors", work)
        url, stop = server.url, server.stop
    else:
        repo_id = "bench/big"
        make_shards(work / "plain" / repo_id, args.shards, args.shard_mb << 20)
        (work / "plain" / repo_id / "README.md").write_text("# bench/big\n")
        httpd, url = serve(work / "plain", rate_mb=args.rate)
        stop = httpd.shutdown
    py = sys.executable
    bindir = Path(py).parent
    env = {**os.environ, "HF_ENDPOINT": url, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    env.pop("REGISTRY_DATABASE_URL", None)
    results = {}
    try:
        for name in ("registry-home", "hf-cache", "hf-cache-verify"):
            shutil.rmtree(work / name, ignore_errors=True)
        snap = (f"from huggingface_hub import snapshot_download; "
                f"snapshot_download({repo_id!r}, cache_dir={str(work / '%s')!r}, max_workers=8)")
        results["snapshot_download (unverified)"] = timed([py, "-c", snap % "hf-cache"], env)
        reg_env = {**env, "REGISTRY_HOME": str(work / "registry-home")}
        t_pull = timed([str(bindir / "registry"), "pull", repo_id, "--json"], reg_env)
        results["registry pull (verified)"] = t_pull
        t_dl = timed([py, "-c", snap % "hf-cache-verify"], env)
        if args.cold:
            subprocess.run(["sync"], check=True)
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
        t_verify = timed([str(bindir / "hf"), "cache", "verify", repo_id, "--cache-dir",
                          str(work / "hf-cache-verify")], env)
        results["snapshot_download + hf cache verify"] = (t_dl[0] + t_verify[0], t_dl[1] + t_verify[1])
        pulled = json.loads(subprocess.run([str(bindir / "registry"), "show", repo_id, "--json"], env=reg_env,
                                           capture_output=True, text=True, check=True).stdout)
        job = json.loads(subprocess.run([str(bindir / "registry"), "jobs", "--json"], env=reg_env,
                                        capture_output=True, text=True, check=True).stdout)[0]
    finally:
        stop()
    gb = pulled["size"] / 1e9
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    link = f"limited to {args.rate:g} MB/s" if args.rate else "unlimited"
    print(f"model: {args.shards} LFS shards x {args.shard_mb} MiB = {gb:.2f} GB, {args.server} server on loopback "
          f"({link}); page cache {'dropped' if args.cold else 'warm'} before hf cache verify")
    for name, (secs, io_read) in results.items():
        print(f"  {name:<38} {secs:7.2f} s  {gb / secs:5.2f} GB/s  disk reads {io_read / 1e6:8.1f} MB")
    base = results["snapshot_download (unverified)"][0]
    print(f"registry pull / snapshot_download: {results['registry pull (verified)'][0] / base:.2f}x (target <= 1.1x)")
    print(f"registry pull / (download + hf cache verify): "
          f"{results['registry pull (verified)'][0] / results['snapshot_download + hf cache verify'][0]:.2f}x "
          "(target <= 0.7x)")
    print(f"bytes registry read back after download: {job['result']['bytes_reread']} (target 0)")


if __name__ == "__main__":
    main()
