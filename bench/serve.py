"""Benchmark: `registry serve` as a Hugging Face endpoint and as a catalog API.

    python bench/serve.py [--size-gb 2] [--shards 4] [--runs 3] [--clients 16] [--concurrent-runs 2]
                          [--artifacts 10000] [--requests 500] [--backend sqlite|postgresql|both]
                          [--only download,concurrent,latency]
                          [--quick] [--out bench/out/serve] [--keep]

1. download: a model of `--shards` safetensors files of random data (`--size-gb` GiB in all) is registered with
   `registry import --link` in a fresh SQLite home and served by `registry serve` (uvicorn, a subprocess, with a
   read token); the same files are served by bench/hfserver.py, a plain static server (ThreadingHTTPServer,
   sendfile, the two JSON routes huggingface_hub needs). `huggingface_hub.snapshot_download` (8 workers) fetches
   the model from each in a fresh cache: once untimed (every file checked against the catalog's sha256), then
   `--runs` times, alternating which server goes first; the time is the snapshot_download call alone (in a
   client process, after its imports). Also: how many bytes each server process read (/proc/PID/io rchar, and
   read_bytes from disk) per byte served: one pass over the bytes is 1.0x. After each timed download, the same
   files once more through a client that drops the bytes (httpx, a thread per file): no disk, no hashing.
2. concurrent: `--clients` client processes download at once (each `hf_hub_download` of one shard, shard i mod
   --shards, into its own cache), released together once all have imported; no client may fail and every file
   must have the right sha256. Against both servers, `--concurrent-runs` rounds (alternating which goes first);
   wall time from the release to the last client done (the clients' 8 GB of disk writes weigh in).
3. latency: `--artifacts` artifacts registered with library calls (batches of 500 in one transaction each; a
   few tiny files shared by content, different names, kinds and metadata) in a fresh catalog per backend, then
   `--requests` sequential requests per route through one keep-alive httpx client with a read token:
   /v1/artifacts?q=<a name> (one hit), /v1/artifacts?q=model (every artifact matches; first page and the
   total), /api/models/{repo_id} (random repo) and /api/models?search=<org> (HF listing); p50 and p95.
Targets are printed first; results go to OUT/../serve-results.json (OUT itself is removed unless --keep).
--quick: tiny sizes, a smoke run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from pgdb import drop_pg_database, pg_database  # noqa: E402
from verify import make_shards  # noqa: E402

PY = sys.executable
REGISTRY_BIN = str(Path(PY).parent / "registry")
REPO = "bench/big"
CLK_TCK = os.sysconf("SC_CLK_TCK")
TARGETS = {"download_throughput_vs_static_min": 0.9, "server_bytes_read_per_byte_served_max": 1.05,
           "concurrent_client_errors": 0, "latency_p95_ms_max": 50.0}

DOWNLOAD_CLIENT = """
import json, sys, time
from huggingface_hub import snapshot_download
t = time.perf_counter()
path = snapshot_download(sys.argv[1], cache_dir=sys.argv[2], max_workers=8)
print(json.dumps({"seconds": time.perf_counter() - t, "path": path}))
"""
# The same files fetched by one process with a thread per file through httpx, bytes counted and dropped: no disk
# writes and no hashing, so the servers' own cost shows more than behind snapshot_download.
DISCARD_CLIENT = """
import json, sys, time
from concurrent.futures import ThreadPoolExecutor
import httpx
url, repo, token, files = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
def fetch(name):
    got = 0
    with httpx.Client(timeout=120, headers={"Authorization": "Bearer " + token}, follow_redirects=True) as http:
        with http.stream("GET", f"{url}/{repo}/resolve/main/{name}") as response:
            response.raise_for_status()
            for chunk in response.iter_raw(1 << 20):
                got += len(chunk)
    return got
t = time.perf_counter()
with ThreadPoolExecutor(len(files)) as pool:
    got = sum(pool.map(fetch, files))
print(json.dumps({"seconds": time.perf_counter() - t, "bytes": got}))
"""
# Imports first, says "ready", waits for "go" on stdin: every client starts its download at the same moment.
CONCURRENT_CLIENT = """
import json, sys, time
from huggingface_hub import hf_hub_download
print("ready", flush=True)
sys.stdin.readline()
t = time.time()
try:
    path = hf_hub_download(sys.argv[1], sys.argv[2], cache_dir=sys.argv[3])
except Exception as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}"[:500]}), flush=True)
    sys.exit(1)
print(json.dumps({"start": t, "end": time.time(), "path": path}), flush=True)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def proc_io(pid: int) -> dict[str, float]:
    """rchar (bytes passed to read/pread/sendfile, page cache or not), read_bytes (from the disk) and cpu (user +
    system seconds, all threads)."""
    lines = Path(f"/proc/{pid}/io").read_text().splitlines()
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": utime and stime are fields 14 and 15
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return {**{k: int(v) for k, v in (line.split(": ") for line in lines)}, "cpu": cpu}


def sha256_of(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def make_token(home: Path, db_url: str | None) -> str:
    from registry import Registry
    from registry.tokens import create_token

    with Registry(home, db_url).session() as s:
        return create_token(s, f"bench-{uuid.uuid4().hex[:6]}", "read")[1]


class Server:
    """A server subprocess on 127.0.0.1 (`registry serve` or the static one), its URL, pid and log."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log: Path, ready_path: str,
                 headers: dict[str, str]):
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log, "w")
        self.proc = subprocess.Popen([*cmd, "--port", str(self.port)], env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        import httpx

        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"{name} exited with {self.proc.returncode}; see {log}")
            try:
                if httpx.get(self.url + ready_path, headers=headers, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"{name} did not answer {ready_path} within 60 s; see {log}")
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def serve_registry(home: Path, db_url: str | None, work: Path, token: str) -> Server:
    env = {**os.environ, "REGISTRY_HOME": str(home)}
    env.pop("REGISTRY_DATABASE_URL", None)
    if db_url:
        env["REGISTRY_DATABASE_URL"] = db_url
    return Server("registry serve", [REGISTRY_BIN, "serve"], env, work / f"serve-{home.name}.log", "/v1/health",
                  {"Authorization": f"Bearer {token}"})


def client_env(url: str, token: str) -> dict[str, str]:
    env = {**os.environ, "HF_ENDPOINT": url, "HF_TOKEN": token, "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_XET": "1"}
    env.pop("HF_HUB_ENABLE_HF_TRANSFER", None)
    return env


def check_files(folder: Path, expected: dict[str, str]) -> list[str]:
    """Problems with the downloaded snapshot: a missing file or a wrong sha256."""
    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        got = dict(zip(expected, pool.map(lambda rel: sha256_of(folder / rel) if (folder / rel).is_file() else None,
                                          expected)))
    return [f"{rel}: {'missing' if got[rel] is None else 'sha256 differs'}"
            for rel in expected if got[rel] != expected[rel]]


# -- 1. download ------------------------------------------------------------------------------------------------

def bench_download(servers: list[Server], token: str, expected: dict[str, str], total: int, runs: int,
                   work: Path) -> dict:
    results: dict[str, list[dict]] = {s.name: [] for s in servers}
    # One untimed download from each first (its files checked): the first download after the set-up ran slower
    # (writeback of the model just written, first requests), and would always have hit the same server.
    for server in servers:
        cache = work / "cache-download"
        shutil.rmtree(cache, ignore_errors=True)
        proc = subprocess.run([PY, "-c", DOWNLOAD_CLIENT, REPO, str(cache)], env=client_env(server.url, token),
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"snapshot_download from {server.name} failed: {proc.stderr[-3000:]}")
        problems = check_files(Path(json.loads(proc.stdout.strip().splitlines()[-1])["path"]), expected)
        if problems:
            raise SystemExit(f"{server.name} served wrong bytes: {problems}")
        shutil.rmtree(cache, ignore_errors=True)
    os.sync()
    for run in range(runs):
        for server in servers if run % 2 == 0 else servers[::-1]:
            cache = work / "cache-download"
            shutil.rmtree(cache, ignore_errors=True)
            before = proc_io(server.proc.pid)
            proc = subprocess.run([PY, "-c", DOWNLOAD_CLIENT, REPO, str(cache)], env=client_env(server.url, token),
                                  capture_output=True, text=True)
            after = proc_io(server.proc.pid)
            if proc.returncode != 0:
                raise SystemExit(f"snapshot_download from {server.name} failed: {proc.stderr[-3000:]}")
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            entry = {"seconds": out["seconds"], "gb_per_s": total / out["seconds"] / 1e9,
                     "rchar_per_byte": (after["rchar"] - before["rchar"]) / total,
                     "disk_read_per_byte": (after["read_bytes"] - before["read_bytes"]) / total,
                     "server_cpu_s_per_gb": (after["cpu"] - before["cpu"]) / (total / 1e9)}
            shutil.rmtree(cache, ignore_errors=True)
            proc = subprocess.run([PY, "-c", DISCARD_CLIENT, server.url, REPO, token, *expected], capture_output=True,
                                  text=True)
            if proc.returncode != 0:
                raise SystemExit(f"the discarding client failed against {server.name}: {proc.stderr[-3000:]}")
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            if out["bytes"] != total:
                raise SystemExit(f"{server.name} sent {out['bytes']} bytes instead of {total}")
            entry["discard_gb_per_s"] = total / out["seconds"] / 1e9
            results[server.name].append(entry)
            print(f"  run {run + 1} {server.name:<15} {entry['seconds']:6.2f} s  {entry['gb_per_s']:5.2f} GB/s  "
                  f"server read {entry['rchar_per_byte']:.3f}x the bytes served "
                  f"(from disk {entry['disk_read_per_byte']:.3f}x), "
                  f"server CPU {entry['server_cpu_s_per_gb']:.2f} s/GB; "
                  f"discarding client {entry['discard_gb_per_s']:5.2f} "
                  "GB/s", flush=True)
    return results


# -- 2. concurrent clients --------------------------------------------------------------------------------------

def bench_concurrent(server: Server, token: str, expected: dict[str, str], sizes: dict[str, int], clients: int,
                     work: Path) -> dict:
    shards = sorted(p for p in expected if p.endswith(".safetensors"))
    root = work / "cache-concurrent"
    shutil.rmtree(root, ignore_errors=True)
    env = client_env(server.url, token)
    procs = []
    for i in range(clients):
        procs.append(subprocess.Popen([PY, "-c", CONCURRENT_CLIENT, REPO, shards[i % len(shards)], str(root / str(i))],
                                      env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    for p in procs:  # all imported
        if p.stdout.readline().strip() != "ready":
            raise SystemExit(f"a client did not start: {p.stderr.read()[-2000:]}")
    before = proc_io(server.proc.pid)
    released = time.time()
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    outcomes, errors = [], []
    for i, p in enumerate(procs):
        out, err = p.communicate()
        line = out.strip().splitlines()[-1] if out.strip() else "{}"
        result = json.loads(line)
        if p.returncode != 0 or "error" in result:
            errors.append(result.get("error") or err[-500:])
        else:
            outcomes.append((i, result))
    after = proc_io(server.proc.pid)  # before our hashing below
    wrong = []
    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        hashes = pool.map(lambda o: (o[0], sha256_of(Path(o[1]["path"]))), outcomes)
        for i, digest in hashes:
            if digest != expected[shards[i % len(shards)]]:
                wrong.append(f"client {i}: sha256 differs")
    shutil.rmtree(root, ignore_errors=True)
    wall = max((r["end"] for _, r in outcomes), default=released) - released
    served = sum(sizes[shards[i % len(shards)]] for i, _ in outcomes)
    result = {"clients": clients, "errors": errors + wrong, "seconds": wall, "gb_per_s": served / wall / 1e9,
              "bytes": served, "server_cpu_s_per_gb": (after["cpu"] - before["cpu"]) / (served / 1e9)}
    print(f"  {server.name:<15} {clients} clients: {len(outcomes)} ok, {len(errors)} failed, {len(wrong)} wrong "
          f"bytes; {served / 1e9:.2f} GB in {wall:.2f} s ({result['gb_per_s']:.2f} GB/s), server CPU "
          f"{result['server_cpu_s_per_gb']:.2f} s/GB", flush=True)
    return result


# -- 3. latency at many artifacts -------------------------------------------------------------------------------

def populate(home: Path, db_url: str | None, count: int, work: Path) -> list[str]:
    """`count` artifacts sharing a few tiny files by content; returns their names."""
    from registry import Registry
    from registry.catalog import register_artifact
    from registry.importer import import_folder
    from registry.schema import KINDS

    reg = Registry(home, db_url)
    reg.init()
    template = work / "tiny"
    make_shards(template, 1, 1024)
    first = import_folder(reg, template, "bench/template-00000")
    with reg.read_session() as s:
        from registry.catalog import resolve

        files = {f.path: (f.sha256, f.size) for f in resolve(s, first.name).files}
    names = [f"org{i % 50:02d}/model-{i:05d}" for i in range(count - 1)]
    start = time.perf_counter()
    for at in range(0, len(names), 500):
        ingested = {p: reg.store.reuse(sha, size) for p, (sha, size) in files.items()}
        with reg.session() as s:
            for i, name in enumerate(names[at:at + 500], start=at):
                register_artifact(s, reg.store, name=name, kind=KINDS[i % len(KINDS)], files=ingested,
                                  meta={"model_type": "llama", "bench_index": i, "team": f"org{i % 50:02d}"})
    print(f"  registered {count} artifacts in {time.perf_counter() - start:.1f} s", flush=True)
    return [first.name, *names]


def percentiles(samples: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return {"p50_ms": cuts[49] * 1000, "p95_ms": cuts[94] * 1000, "max_ms": max(samples) * 1000}


def bench_latency(server: Server, token: str, names: list[str], requests: int) -> dict:
    import httpx

    rng = random.Random(0)
    routes = {
        "GET /v1/artifacts?q=<one name>": lambda: f"/v1/artifacts?q={rng.choice(names).split('/')[1]}",
        "GET /v1/artifacts?q=model (all match)": lambda: "/v1/artifacts?q=model",
        "GET /api/models/{repo_id}": lambda: f"/api/models/{rng.choice(names)}",
        "GET /api/models?search=<org>&limit=50": lambda: f"/api/models?search=org{rng.randrange(50):02d}&limit=50",
    }
    results = {}
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
        for label, path in routes.items():
            for _ in range(min(20, requests)):  # warm-up: connections, caches, first-query plans
                http.get(path())
            samples = []
            for _ in range(requests):
                url = path()
                t = time.perf_counter()
                response = http.get(url)
                samples.append(time.perf_counter() - t)
                if response.status_code != 200:
                    raise SystemExit(f"{label}: {url} answered {response.status_code}: {response.text[:300]}")
            body = response.json()
            results[label] = {**percentiles(samples), "requests": requests}
            if isinstance(body, dict) and "total" in body:
                results[label]["total"] = body["total"]
            r = results[label]
            print(f"    {label:<40} p50 {r['p50_ms']:6.1f} ms  p95 {r['p95_ms']:6.1f} ms  max {r['max_ms']:6.1f} ms"
                  + (f"  (total {r['total']})" if "total" in r else ""), flush=True)
    return results


# -- main -------------------------------------------------------------------------------------------------------

def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=2.0, help="model size in GiB (default 2)")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--concurrent-runs", type=int, default=2, help="rounds of the concurrent part (default 2: "
                        "each server goes first once)")
    parser.add_argument("--artifacts", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="sqlite",
                        help="catalog backend(s) of the latency part (downloads: SQLite)")
    parser.add_argument("--only", default="download,concurrent,latency")
    parser.add_argument("--quick", action="store_true", help="smoke run: 64 MiB, 1 run, 4 clients, 300 artifacts")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "serve")
    parser.add_argument("--keep", action="store_true", help="keep OUT (the model and homes) afterwards")
    args = parser.parse_args()
    if args.quick:
        args.size_gb, args.runs, args.clients, args.artifacts, args.requests = 1 / 16, 1, 4, 300, 50
        args.concurrent_runs = 1
    parts = set(args.only.split(","))
    work = args.out
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"load average {os.getloadavg()[0]:.2f}")
    print("targets: " + json.dumps(TARGETS))
    results: dict = {"targets": TARGETS, "args": {k: str(v) for k, v in vars(args).items()}}
    servers: list[Server] = []
    try:
        if parts & {"download", "concurrent"}:
            shard_bytes = int(args.size_gb * (1 << 30) / args.shards)
            model = work / "static" / REPO
            make_shards(model, args.shards, shard_bytes)
            (model / "README.md").write_text(f"# {REPO}\n")
            home = work / "home"
            env = {**os.environ, "REGISTRY_HOME": str(home)}
            env.pop("REGISTRY_DATABASE_URL", None)
            subprocess.run([REGISTRY_BIN, "import", str(model), "--name", REPO, "--link"], env=env, check=True,
                           capture_output=True)
            shown = json.loads(subprocess.run([REGISTRY_BIN, "show", REPO, "--json"], env=env, check=True,
                                              capture_output=True, text=True).stdout)
            expected = {f["path"]: f["sha256"] for f in shown["file_list"]}
            sizes = {f["path"]: f["size"] for f in shown["file_list"]}
            total = sum(sizes.values())
            token = make_token(home, None)
            servers = [serve_registry(home, None, work, token),
                       Server("static server", [PY, str(ROOT / "bench" / "hfserver.py"), str(work / "static")],
                              os.environ.copy(), work / "static.log", f"/api/models/{REPO}", {})]
            print(f"model: {args.shards} safetensors shards, {total / 1e9:.2f} GB; both servers on 127.0.0.1")
            if "download" in parts:
                print(f"snapshot_download, {args.runs} runs:")
                runs = bench_download(servers, token, expected, total, args.runs, work)
                results["download"] = runs
                reg_gbs = [r["gb_per_s"] for r in runs["registry serve"]]
                static_gbs = [r["gb_per_s"] for r in runs["static server"]]
                ratio = statistics.median(reg_gbs) / statistics.median(static_gbs)
                results["download_ratio"] = ratio
                for name, entries in runs.items():
                    print(f"  {name:<15} median (min-max): {spread([e['seconds'] for e in entries])} s, "
                          f"{spread([e['gb_per_s'] for e in entries])} GB/s, server read "
                          f"{spread([e['rchar_per_byte'] for e in entries], '{:.3f}')}x")
                print(f"registry serve / static server throughput: {ratio:.2f}x "
                      f"(target >= {TARGETS['download_throughput_vs_static_min']}x)")
                discard = (statistics.median(e["discard_gb_per_s"] for e in runs["registry serve"])
                           / statistics.median(e["discard_gb_per_s"] for e in runs["static server"]))
                results["discard_ratio"] = discard
                print(f"server CPU per GB: registry serve "
                      f"{spread([e['server_cpu_s_per_gb'] for e in runs['registry serve']])} s, static server "
                      f"{spread([e['server_cpu_s_per_gb'] for e in runs['static server']])} s")
                print(f"with the discarding client: "
                      f"{spread([e['discard_gb_per_s'] for e in runs['registry serve']])} GB/s against "
                      f"{spread([e['discard_gb_per_s'] for e in runs['static server']])} GB/s: {discard:.2f}x")
            if "concurrent" in parts:
                print(f"{args.clients} concurrent clients, one shard each, {args.concurrent_runs} runs:")
                results["concurrent"] = {s.name: [] for s in servers}
                for run in range(args.concurrent_runs):
                    for server in servers if run % 2 == 0 else servers[::-1]:
                        os.sync()  # the last round's 8 GB of client writes: not this round's problem
                        results["concurrent"][server.name].append(
                            bench_concurrent(server, token, expected, sizes, args.clients, work))
                for name, entries in results["concurrent"].items():
                    print(f"  {name:<15} median (min-max): {spread([e['seconds'] for e in entries])} s, "
                          f"{spread([e['gb_per_s'] for e in entries])} GB/s, server CPU "
                          f"{spread([e['server_cpu_s_per_gb'] for e in entries])} s/GB; "
                          f"errors: {sum(len(e['errors']) for e in entries)}")
            for server in servers:
                server.stop()
            servers = []
        if "latency" in parts:
            results["latency"] = {}
            for backend in (["sqlite", "postgresql"] if args.backend == "both" else [args.backend]):
                pg_name, db_url = pg_database() if backend == "postgresql" else (None, None)
                try:
                    home = work / f"home-{backend}"
                    print(f"latency at {args.artifacts} artifacts, {backend}, {args.requests} requests per route:")
                    names = populate(home, db_url, args.artifacts, work)
                    token = make_token(home, db_url)
                    server = serve_registry(home, db_url, work, token)
                    servers = [server]
                    results["latency"][backend] = bench_latency(server, token, names, args.requests)
                    server.stop()
                    servers = []
                finally:
                    if pg_name:
                        drop_pg_database(pg_name)
    finally:
        for server in servers:
            server.stop()
        (work.parent / "serve-results.json").write_text(json.dumps(results, indent=1))
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"results: {work.parent / 'serve-results.json'}")


if __name__ == "__main__":
    main()
