"""Worker pools: which worker processes a pool wants (job types, GPU), starting them, and restart backoff.

A worker is a real `registry worker --type ...` process (merge and quantize use much memory, a GPU and native
code that can crash: a thread could take the daemon down with it), started through child.py so that it dies
with the daemon and logs into the daemon's stream.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Mapping

from .config import PoolConfig
from .logs import pump_worker_output

log = logging.getLogger("registry.daemon")
# A worker that ran this long before it died was healthy: its next restart starts from the first backoff step.
HEALTHY_SECONDS = 60.0


def detect_gpus(env: Mapping[str, str] = os.environ) -> list[str]:
    """The GPUs this host offers, as CUDA_VISIBLE_DEVICES values: the daemon's own CUDA_VISIBLE_DEVICES when
    set (CUDA ignores everything from the first invalid entry on), else what `nvidia-smi -L` lists (MIG
    instances by UUID, since an index cannot name them), else none."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        devices = []
        for part in (p.strip() for p in visible.split(",")):
            if not part or part.startswith("-"):
                break
            devices.append(part)
        return devices
    smi = shutil.which("nvidia-smi", path=env.get("PATH"))
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("nvidia-smi -L failed (%s); assuming no GPU", exc)
        return []
    return parse_nvidia_smi(out)


def parse_nvidia_smi(listing: str) -> list[str]:
    """["0", "1"] from `nvidia-smi -L`; a GPU split into MIG instances gives its instances' UUIDs instead."""
    devices: list[str] = []
    current: str | None = None
    migs: list[str] = []

    def flush() -> None:
        if current is not None:
            devices.extend(migs or [current])

    for line in listing.splitlines():
        gpu = re.match(r"^GPU (\d+):", line)
        mig = re.search(r"^\s+MIG .*\(UUID: (MIG-[^)]+)\)", line)
        if gpu:
            flush()
            current, migs = gpu.group(1), []
        elif mig and current is not None:
            migs.append(mig.group(1))
    flush()
    return devices


def worker_gpus(pool: PoolConfig, detected: list[str]) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES for each worker of the pool: None leaves the daemon's value, "" hides every GPU."""
    if pool.gpus == "none":
        return [""] * (pool.size or 1)
    devices = list(pool.gpus) if isinstance(pool.gpus, tuple) else detected if pool.gpus == "auto" else []
    if not devices:
        return [None] * (pool.size or 1)
    return [devices[i % len(devices)] for i in range(pool.size or len(devices))]


def backoff_delay(failures: int, first: float, maximum: float) -> float:
    """Seconds before restart number `failures` (1, 2, ...) of a worker that keeps dying: first, 2x, 4x, ... max."""
    return min(maximum, first * 2 ** max(0, failures - 1))


@dataclass
class WorkerSpec:
    """What one worker is: restarting a worker with the same spec keeps its place; a new spec replaces it."""

    pool: str
    jobs: tuple[str, ...]
    gpu: str | None
    lease: float
    poll: float


def pool_specs(pool: PoolConfig, detected: list[str]) -> list[WorkerSpec]:
    return [WorkerSpec(pool.name, pool.jobs, gpu, pool.lease, pool.poll) for gpu in worker_gpus(pool, detected)]


class WorkerSlot:
    """One place in a pool: the process filling it now, and how often it had to be restarted."""

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.failures = 0  # deaths in a row without a healthy run in between: the backoff step
        self.started_at = 0.0  # time.monotonic() of the current process's start
        self.start_after = 0.0  # time.monotonic() before which it is not restarted
        self.last_exit: str | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, env: dict[str, str], grace: float, debug: bool) -> None:
        spec = self.spec
        args = ["worker", "--lease", f"{spec.lease:g}", "--poll", f"{spec.poll:g}", "--grace", f"{grace:g}",
                *[f"--type={t}" for t in spec.jobs]]
        env = dict(env)
        env.pop("NOTIFY_SOCKET", None)  # systemd's readiness socket is the daemon's, not its workers'
        if spec.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = spec.gpu
        if debug:
            env["REGISTRY_DEBUG"] = "1"
        # Own session: Ctrl-C on the daemon's terminal reaches the daemon only, which then stops the workers
        # once (a second signal would make them re-queue their jobs at once instead of finishing them).
        self.proc = subprocess.Popen([sys.executable, "-m", "registry.daemon.child", str(os.getpid()), *args],
                                     env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
        self.started_at = time.monotonic()
        pump_worker_output(self.proc.stdout, spec.pool, self.proc.pid)
        gpu = f" on GPU {spec.gpu}" if spec.gpu else ""
        log.info("pool %s: started worker pid %s%s", spec.pool, self.proc.pid, gpu)

    def exited(self, first_backoff: float, max_backoff: float) -> float:
        """Record the death of the current process; returns the seconds to wait before restarting it."""
        code = self.proc.returncode
        self.last_exit = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        ran = time.monotonic() - self.started_at
        self.failures = 1 if ran >= max(HEALTHY_SECONDS, max_backoff) else self.failures + 1
        delay = backoff_delay(self.failures, first_backoff, max_backoff)
        self.start_after = time.monotonic() + delay
        return delay

    def signal(self, signum: int) -> None:
        if self.alive():
            try:
                os.kill(self.proc.pid, signum)
            except ProcessLookupError:
                pass

    def snapshot(self) -> dict:
        return {"pid": self.pid, "gpu": self.spec.gpu, "restarts": self.restarts, "alive": self.alive(),
                "last_exit": self.last_exit}
