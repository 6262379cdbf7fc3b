"""Benchmark: `registry daemon --workers 4` idle CPU, job pickup latency, and 1,000 small jobs with no double runs.

    python bench/daemon.py [--backend sqlite|postgresql|both] [--mode auto|daemon|workers] [--runs 1]
                           [--idle 30] [--settle 10] [--poll SECONDS] [--samples 50] [--jobs 1000]
                           [--out bench/out/daemon] [--keep]

For each catalog backend (a fresh SQLite home, and a fresh database on the PostgreSQL server that
REGISTRY_BENCH_PG names, default postgresql://postgres@127.0.0.1:5432/test):
1. registers a tiny artifact (two small files) and starts `registry daemon --workers 4` (`--mode workers`:
   four `registry worker` processes instead, the daemon's worker side alone; `auto` uses the daemon when the
   command exists);
2. idle CPU: once the queue is empty and `--settle` seconds passed (start-up), the user+system CPU time of the daemon and every process under it
   (/proc/PID/stat utime+stime) over `--idle` seconds, as a percentage of one core;
3. pickup latency: `--samples` times, one `verify --quick` job queued with jobs.enqueue while every worker is
   idle; latency = the job's started_at - created_at (both by the catalog's clock); p50 and p95;
4. throughput: `--jobs` `verify --quick` jobs queued in one transaction (no dedup key), run by the 4 workers;
   wall time from the commit until the last one finished, and the check that each ran once: every job
   succeeded with attempts == 1 and has exactly one `verified_ok` event.
Prints one line per backend and run, then the median and the spread (min-max) over runs; writes results.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pgdb import drop_pg_database, pg_database  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
REGISTRY_BIN = str(Path(sys.executable).parent / "registry")
CLK_TCK = os.sysconf("SC_CLK_TCK")
WORKERS = 4
TARGETS = {"idle_cpu_percent": 1.0, "pickup_p50_ms_postgresql": 200.0, "double_runs": 0}


def write_model(folder: Path) -> None:
    """A tiny valid model folder (config and one small safetensors file)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    raw = json.dumps({"w": {"dtype": "U8", "shape": [1024], "data_offsets": [0, 1024]}}).encode()
    raw += b" " * (-len(raw) % 8)
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(1024))


# -- CPU time of a process tree, from /proc --

def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, utime + stime in clock ticks) of a process, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = raw[raw.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, ... utime is field 14
    return int(rest[1]), int(rest[11]) + int(rest[12])


def tree(root: int) -> dict[int, int]:
    """CPU ticks of `root` and each of its descendants, by pid."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None:
                stats[int(entry)] = st
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            found[pid] = stats[pid][1]
            todo.extend(children.get(pid, []))
    return found


# -- the system under test --

class System:
    """`registry daemon --workers 4`, or four `registry worker` processes under one shell."""

    def __init__(self, mode: str, env: dict[str, str], log: Path, poll: float | None = None):
        self.mode, self.log = mode, open(log, "w")
        if mode == "daemon" and poll is None:
            cmd = [REGISTRY_BIN, "daemon", "--workers", str(WORKERS)]
            self.command = f"registry daemon --workers {WORKERS}"
        elif mode == "daemon":  # the same single pool, from a config file that sets the workers' --poll
            from registry.schema import JOB_TYPES

            config = log.parent / "daemon.toml"
            config.write_text(f"[pools.all]\nsize = {WORKERS}\njobs = {json.dumps(list(JOB_TYPES))}\n"
                              f"poll = {poll:g}\n")
            cmd = [REGISTRY_BIN, "daemon", "--config", str(config)]
            self.command = f"registry daemon --config daemon.toml ([pools.all] size = {WORKERS}, poll = {poll:g})"
        else:  # a shell that runs the workers and waits: one root for the CPU accounting and the stop signal
            worker = f"{REGISTRY_BIN} worker" + (f" --poll {poll:g}" if poll else "")
            cmd = ["bash", "-c", f"trap 'kill -TERM $(jobs -p); wait' TERM; "
                                 f"for i in $(seq {WORKERS}); do {worker} & done; wait"]
            self.command = f"{WORKERS} x registry worker" + (f" --poll {poll:g}" if poll else "")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def worker_pids(self) -> list[int]:
        """The `registry worker` processes under the root."""
        found = []
        for pid in tree(self.proc.pid):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if pid != self.proc.pid and b"worker" in argv[1:5]:
                found.append(pid)
        return found

    def wait_for_workers(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while len(self.worker_pids()) < WORKERS:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.command} exited with {self.proc.returncode}; see {self.log.name}")
            if time.monotonic() > deadline:
                raise SystemExit(f"{self.command}: {WORKERS} workers did not start in {timeout:g} s")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def daemon_available() -> bool:
    return subprocess.run([REGISTRY_BIN, "daemon", "--help"], capture_output=True).returncode == 0


# -- catalog helpers (library calls in this process) --

def unfinished(reg) -> int:
    from sqlalchemy import func, select

    from registry.models import Job

    with reg.read_session() as s:
        return s.execute(select(func.count()).where(Job.state.in_(("queued", "running")))).scalar()


def wait_idle(reg, settle: float, timeout: float = 120) -> None:
    """Until no job is queued or running (the daemon's start-up scrub and prune), then `settle` s more."""
    deadline = time.monotonic() + timeout
    while unfinished(reg):
        if time.monotonic() > deadline:
            raise SystemExit("the queue never emptied")
        time.sleep(0.2)
    time.sleep(settle)


def enqueue_verifies(reg, artifact_id: int, n: int) -> list[int]:
    from registry import jobs

    with reg.session() as s:
        made = [jobs.enqueue(s, "verify", {"artifact_ids": [artifact_id], "quick": True})[0] for _ in range(n)]
        s.flush()
        return [j.id for j in made]


def measure_idle(system: System, seconds: float) -> dict:
    before = tree(system.proc.pid)
    began = time.monotonic()
    time.sleep(seconds)
    after = tree(system.proc.pid)
    wall = time.monotonic() - began
    ticks = sum(after.get(pid, 0) - t for pid, t in before.items() if pid in after)
    supervisor = after.get(system.proc.pid, 0) - before.get(system.proc.pid, 0)
    return {"idle_cpu_percent": round(100 * ticks / CLK_TCK / wall, 3),
            "idle_cpu_supervisor_percent": round(100 * supervisor / CLK_TCK / wall, 3),
            "processes": len(after), "idle_seconds": round(wall, 1)}


def measure_pickup(reg, artifact_id: int, samples: int) -> dict:
    from registry import jobs

    latencies = []
    for _ in range(samples):
        time.sleep(random.uniform(0.3, 0.6))  # every worker back to waiting
        (job_id,) = enqueue_verifies(reg, artifact_id, 1)
        deadline = time.monotonic() + 30
        while True:
            with reg.read_session() as s:
                job = jobs.get(s, job_id)
                if job.state in ("succeeded", "failed", "cancelled"):
                    latencies.append((job.started_at - job.created_at).total_seconds() * 1000)
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"job {job_id} was not run within 30 s")
            time.sleep(0.02)
    q = statistics.quantiles(latencies, n=20)
    return {"pickup_p50_ms": round(statistics.median(latencies), 1), "pickup_p95_ms": round(q[-1], 1),
            "pickup_max_ms": round(max(latencies), 1)}


def measure_throughput(reg, artifact_id: int, n: int) -> dict:
    from sqlalchemy import func, select

    from registry.models import Event, Job

    began = time.monotonic()
    ids = enqueue_verifies(reg, artifact_id, n)
    while unfinished(reg):
        if time.monotonic() - began > 1800:
            raise SystemExit("1,000 jobs did not finish in 30 minutes")
        time.sleep(0.1)
    wall = time.monotonic() - began
    with reg.read_session() as s:
        rows = s.execute(select(Job.id, Job.state, Job.attempts).where(Job.id.in_(ids))).all()
        events = dict(s.execute(select(Event.job_id, func.count()).where(Event.job_id.in_(ids),
                                                                         Event.kind == "verified_ok")
                                .group_by(Event.job_id)).all())
        owners = s.execute(select(func.count(func.distinct(Job.lease_owner))).where(Job.id.in_(ids))).scalar()
    not_ok = [i for i, state, _ in rows if state != "succeeded"]
    doubles = [i for i, _, attempts in rows if attempts != 1 or events.get(i, 0) != 1]
    return {"jobs": n, "jobs_wall_s": round(wall, 2), "jobs_per_s": round(n / wall, 1), "jobs_not_succeeded":
            len(not_ok), "double_runs": len(doubles), "lease_owners_left": owners}


# -- one backend, one run --

def run_backend(backend: str, mode: str, out: Path, args) -> dict:
    from registry import Registry
    from registry.db import dispose_all
    from registry.importer import import_folder

    work = out / f"{backend}-{uuid.uuid4().hex[:6]}"
    home = work / "home"
    env = {**os.environ, "REGISTRY_HOME": str(home)}
    env.pop("REGISTRY_DATABASE_URL", None)
    pg_name = None
    if backend == "postgresql":
        pg_name, env["REGISTRY_DATABASE_URL"] = pg_database()
    system = None
    try:
        reg = Registry(home, env.get("REGISTRY_DATABASE_URL"))
        reg.init()
        write_model(work / "tiny")
        artifact_id = import_folder(reg, work / "tiny", "tiny").artifact_id
        system = System(mode, env, work / f"{mode}.log", args.poll)
        system.wait_for_workers()
        wait_idle(reg, settle=args.settle)
        result = {"backend": backend, "mode": mode, "command": system.command}
        result |= measure_idle(system, args.idle)
        result |= measure_pickup(reg, artifact_id, args.samples)
        result |= measure_throughput(reg, artifact_id, args.jobs)
        result["workers_alive_after"] = len(system.worker_pids())
        return result
    finally:
        if system is not None:
            system.stop()
        dispose_all()
        if pg_name:
            drop_pg_database(pg_name)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--mode", choices=["auto", "daemon", "workers"], default="auto")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of idle CPU measurement")
    parser.add_argument("--settle", type=float, default=10.0,
                        help="seconds to wait after start-up (imports, first queries) before measuring idle CPU")
    parser.add_argument("--poll", type=float, help="the workers' --poll (a [pools.all] config for the daemon); "
                        "default: the daemon's default")
    parser.add_argument("--samples", type=int, default=50, help="pickup latency samples")
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "daemon")
    parser.add_argument("--keep", action="store_true", help="keep the homes and logs")
    args = parser.parse_args()
    mode = args.mode
    if mode == "auto":
        mode = "daemon" if daemon_available() else "workers"
        if mode == "workers":
            print("`registry daemon` is not available: measuring 4 `registry worker` processes", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} "
          f"{platform.python_version()}, {datetime.now(timezone.utc):%Y-%m-%d}", flush=True)
    results = []
    for run in range(args.runs):
        for backend in backends:
            r = run_backend(backend, mode, args.out, args)
            r["run"] = run + 1
            results.append(r)
            print(f"run {run + 1} {backend:10} {r['command']}: idle CPU {r['idle_cpu_percent']:.2f}% of a core "
                  f"(supervisor {r['idle_cpu_supervisor_percent']:.2f}%, {r['processes']} processes); pickup "
                  f"p50 {r['pickup_p50_ms']:.0f} ms p95 {r['pickup_p95_ms']:.0f} ms; {r['jobs']} jobs in "
                  f"{r['jobs_wall_s']:.1f} s ({r['jobs_per_s']:.0f}/s), not succeeded {r['jobs_not_succeeded']}, "
                  f"double runs {r['double_runs']}", flush=True)
    for backend in backends:
        mine = [r for r in results if r["backend"] == backend]
        print(f"{backend}: median (min-max) over {len(mine)} run(s)")
        for key in ("idle_cpu_percent", "pickup_p50_ms", "pickup_p95_ms", "jobs_wall_s", "double_runs"):
            values = [r[key] for r in mine]
            print(f"  {key}: {statistics.median(values):g} ({min(values):g}-{max(values):g})")
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    failed = [r for r in results if r["double_runs"] or r["jobs_not_succeeded"]]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
