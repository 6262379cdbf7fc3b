"""`registry daemon`, the supervisor (issue 10, item 1): real daemons with real worker processes on SQLite and
PostgreSQL. Pools and GPU pinning, a worker killed with -9 (its job taken over at once and done once), the daemon
killed with -9 (no orphaned worker, nothing lost or done twice), SIGTERM drains, SIGHUP reloads, one daemon per
SQLite home, JSON logs with the workers' lines, `registry daemon status`, systemd's readiness protocol."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from sqlalchemy import func, select

from conftest import REGISTRY_BIN, cli_json, run_cli
from hubproxy import free_port
from test_jobs import _sparse_model
from registry import Registry, jobs
from registry.daemon import state
from registry.models import Artifact, Job

# Short everything (a restart after 0.2 s, a state file every 0.5 s) and no scheduled jobs.
FAST = "restart_backoff = 0.2\nrestart_backoff_max = 1\nstate_interval = 0.5\n"
NO_SCHEDULES = "[scrub]\nenabled = false\n[prune]\nenabled = false\n"


def conf(text: str) -> str:
    """A daemon.toml: FAST, then `text` (top-level keys first, then tables), then the schedules turned off."""
    return FAST + text + NO_SCHEDULES
TIMEOUT = 90  # generous: a loaded 2-core machine starts a Python process in seconds


def wait_for(what: str, check, timeout: float = TIMEOUT, interval: float = 0.1, log=None):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}" + (f"; log:\n{log()}" if log else "")
        time.sleep(interval)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


class Daemon:
    """A `registry daemon` process with its log in a file and its state read as `daemon status` reads it."""

    def __init__(self, home: Path, config: str, *args: str, env: dict | None = None, name: str = "daemon"):
        self.home = home
        self.config = home.parent / f"{name}.toml"
        self.config.write_text(config)
        self.log_path = home.parent / f"{name}.log"
        self.log_file = open(self.log_path, "w")
        self.proc = subprocess.Popen([REGISTRY_BIN, "daemon", "--config", str(self.config), *args],
                                     stdout=self.log_file, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        self.workers_seen: set[int] = set()

    def log(self) -> str:
        return self.log_path.read_text()

    def state(self) -> dict | None:
        for d in state.read_all(self.home, jobs.this_host()):
            if d["pid"] == self.proc.pid and d["running"]:
                for pool in d["pools"].values():
                    self.workers_seen.update(w["pid"] for w in pool["workers"] if w["pid"])
                return d
        return None

    def workers(self, pool: str | None = None) -> list[dict]:
        d = self.state() or {"pools": {}}
        return [w for name, p in d["pools"].items() if pool in (None, name) for w in p["workers"]]

    def wait_workers(self, count: int, pool: str | None = None) -> list[dict]:
        """Until `count` workers are alive (and have logged that they started, so they claim jobs)."""
        def ready():
            ws = [w for w in self.workers(pool) if w["alive"]]
            log = self.log()
            return len(ws) == count and all(f":{w['pid']}:" in log for w in ws) and ws
        assert self.proc.poll() is None, self.log()
        return wait_for(f"{count} workers", ready, log=self.log)

    def stop(self, timeout: float = TIMEOUT) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self.log_file.close()
        return code

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in self.workers_seen:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.log_file.close()


@pytest.fixture
def daemons(tmp_path):
    started: list[Daemon] = []

    def start(home: Path, config: str, *args: str, **kw) -> Daemon:
        home.mkdir(parents=True, exist_ok=True)
        d = Daemon(home, config, *args, name=f"daemon{len(started)}", **kw)
        started.append(d)
        return d
    yield start
    for d in started:
        d.cleanup()


def slow_import(tmp_path: Path, size: int = 1024 ** 3) -> int:
    """Queue the import of a 1 GiB (sparse) model: a job that runs for a few seconds."""
    model = _sparse_model(tmp_path / "big", size)
    return cli_json("import", str(model), "--name", "big", "--link", "--detach")["job"]


def job_row(job_id: int) -> Job:
    with Registry().read_session() as s:
        return jobs.get(s, job_id)


def finished(job_id: int) -> Job | None:
    row = job_row(job_id)
    return row if row.state in ("succeeded", "failed", "cancelled") else None


def owner_pid(job: Job) -> int:
    return int(job.lease_owner.rsplit(":", 2)[1])


def imported_once(job_id: int) -> Job:
    with Registry().read_session() as s:
        job = jobs.get(s, job_id)
        assert job.state == "succeeded", (job.state, job.error)
        assert s.scalar(select(func.count()).select_from(Artifact).where(Artifact.name == "big")) == 1
        assert s.scalar(select(func.count()).select_from(Job).where(Job.type == "import")) == 1
        return job


# --- pools, GPU pinning, status, JSON logs, metrics, systemd notify, drain ----------------------------------

def test_pools_pin_gpus_report_status_log_json_and_drain(db_url, home, daemons, tiny_model, tmp_path):
    run_cli("import", str(tiny_model), "--name", "tiny")
    sock_dir = tempfile.TemporaryDirectory()  # short: a unix socket path has at most 107 bytes
    notify_path = f"{sock_dir.name}/notify"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(TIMEOUT)
    port = free_port()
    config = conf("[pools.io]\nsize = 1\njobs = [\"import\"]\n[pools.gpu]\njobs = [\"verify\"]\ngpus = [0, 1]\n")
    d = daemons(home, config, "--log-format", "json", "--metrics", f"127.0.0.1:{port}",
                env={"NOTIFY_SOCKET": notify_path})
    assert notify.recv(4096).startswith(b"READY=1")
    gpu_workers = d.wait_workers(2, "gpu")
    assert sorted(w["gpu"] for w in gpu_workers) == ["0", "1"]
    for w in gpu_workers:  # each worker sees only its GPU
        environ = Path(f"/proc/{w['pid']}/environ").read_bytes().split(b"\0")
        assert f"CUDA_VISIBLE_DEVICES={w['gpu']}".encode() in environ
    d.wait_workers(1, "io")

    job = cli_json("verify", "tiny", "--detach")["job"]  # only the GPU pool runs verify jobs
    wait_for("the verify job", lambda: job_row(job).state == "succeeded")
    ran = wait_for("its log line", lambda: [json.loads(x) for x in d.log().splitlines() if f'"job {job} succeeded' in x])
    assert ran[0]["pool"] == "gpu" and ran[0]["worker_pid"] in {w["pid"] for w in gpu_workers}

    status = cli_json("daemon", "status")["daemons"]
    assert [s["pid"] for s in status] == [d.proc.pid]
    assert status[0]["pools"]["gpu"]["size"] == 2 and status[0]["pools"]["io"]["jobs"] == ["import"]
    text = run_cli("daemon", "status").stdout
    assert f"daemon pid {d.proc.pid}" in text and "pool gpu: 2 worker(s) for verify" in text and " gpu 1: idle" in text
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30) as reply:
        assert reply.status == 200

    assert d.stop() == 0
    assert notify.recv(4096).startswith(b"STOPPING=1")
    assert not any(alive(pid) for pid in d.workers_seen)
    assert not list((home / "daemon").glob("state-*.json"))
    assert run_cli("daemon", "status", check=3).stderr.startswith("error: no registry daemon is running on")
    notify.close()
    sock_dir.cleanup()
    lines = [json.loads(line) for line in d.log().splitlines()]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    from_workers = [line for line in lines if line.get("pool") == "gpu"]
    assert any(line["logger"] == "registry.worker" and "started for verify jobs" in line["message"]
               for line in from_workers), lines
    assert lines[-1]["message"] == "daemon stopped"


# --- a worker killed with -9 --------------------------------------------------------------------------------

def test_killed_worker_is_restarted_and_its_job_taken_over_at_once(db_url, home, daemons, tmp_path):
    config = conf("[pools.io]\nsize = 2\njobs = [\"import\"]\nlease = \"60s\"\n")
    d = daemons(home, config)
    d.wait_workers(2)
    job = slow_import(tmp_path)
    first = wait_for("the import to start", lambda: (j := job_row(job)).state == "running" and j)
    victim = owner_pid(first)
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    # Taken over at once by the other worker, not when the 60 s lease runs out.
    second = wait_for("another worker to take the job", lambda: (j := job_row(job)).attempts == 2 and j)
    assert time.monotonic() - killed_at < 20 and owner_pid(second) != victim
    done = wait_for("the import to finish", lambda: finished(job))
    assert imported_once(job).attempts == 2 == done.attempts
    restarted = wait_for("the restart", lambda: [w for w in d.workers() if w["restarts"] == 1 and w["alive"]])
    assert restarted[0]["pid"] != victim and restarted[0]["last_exit"] == "killed by signal 9"
    assert f"worker pid {victim} died (killed by signal 9); restarting it in 0.2s" in d.log()
    assert f" INFO registry.worker [io/{victim}] worker " in d.log()  # the workers' lines, in the daemon's log
    assert d.stop() == 0


# --- the daemon killed with -9 ------------------------------------------------------------------------------

def test_killed_daemon_leaves_no_worker_and_loses_nothing(db_url, home, daemons, tmp_path):
    config = conf("grace = 0.5\n[pools.io]\nsize = 1\njobs = [\"import\"]\n")
    d = daemons(home, config)
    worker = d.wait_workers(1)[0]["pid"]
    job = slow_import(tmp_path)
    wait_for("the import to start", lambda: job_row(job).state == "running")
    d.proc.kill()
    d.proc.wait()
    # The worker learns its daemon died (PR_SET_PDEATHSIG), stops within its grace and re-queues the job.
    wait_for("the orphaned worker to exit", lambda: not alive(worker), timeout=30)
    assert job_row(job).state == "queued"
    again = daemons(home, config)
    wait_for("the import to finish", lambda: finished(job))
    imported_once(job)
    assert again.stop() == 0


# --- SIGTERM drains -----------------------------------------------------------------------------------------

def test_sigterm_lets_the_running_job_finish_then_exits_0(db_url, home, daemons, tmp_path):
    config = conf("grace = 120\n[pools.io]\nsize = 1\njobs = [\"import\"]\n")
    d = daemons(home, config)
    worker = d.wait_workers(1)[0]["pid"]
    # 4 GiB: hashing must outlast two `daemon status` calls even on a fast machine (1 GiB took under 2 s in CI).
    job = slow_import(tmp_path, 4 * 1024 ** 3)
    wait_for("the import to start", lambda: job_row(job).state == "running")

    def shown():  # `daemon status` shows the job under its worker, with its progress from the catalog
        if f"pid {worker}: job {job} import " not in run_cli("daemon", "status").stdout:
            return None
        [w] = cli_json("daemon", "status")["daemons"][0]["pools"]["io"]["workers"]
        return w["pid"] == worker and [j for j in w["jobs"] if j["id"] == job and j["progress_total"]]
    [running] = wait_for("the job in daemon status", shown, interval=0.3)
    assert running["type"] == "import" and running["progress_total"] >= 4 * 1024 ** 3
    assert d.stop() == 0  # returns once the worker finished its job
    assert imported_once(job).attempts == 1
    assert "(exit code 0)" in d.log()


def test_sigterm_requeues_a_job_that_outlasts_the_grace(home, daemons, tmp_path):
    config = conf("grace = 0.5\n[pools.io]\nsize = 1\njobs = [\"import\"]\n")
    d = daemons(home, config)
    d.wait_workers(1)
    job = slow_import(tmp_path)
    wait_for("the import to start", lambda: job_row(job).state == "running")
    started = time.monotonic()
    assert d.stop() == 0
    assert time.monotonic() - started < 15
    back = job_row(job)
    assert (back.state, back.attempts, back.lease_owner) == ("queued", 0, None)
    assert "queued again for another worker" in d.log() and "(exit code 130)" in d.log()


# --- SIGHUP reloads -----------------------------------------------------------------------------------------

def test_sighup_resizes_pools_adds_a_watch_and_keeps_the_old_config_when_the_new_one_is_bad(home, daemons, tmp_path):
    d = daemons(home, conf("[pools.io]\nsize = 1\njobs = [\"verify\"]\n"))
    first = d.wait_workers(1)[0]["pid"]
    drop = tmp_path / "drop"
    drop.mkdir()
    d.config.write_text(conf(f"[pools.io]\nsize = 2\njobs = [\"verify\"]\n[[watch]]\npath = \"{drop}\"\n"))
    d.proc.send_signal(signal.SIGHUP)
    workers = d.wait_workers(2)
    assert first in [w["pid"] for w in workers]  # the unchanged worker was left alone
    assert wait_for("the watch", lambda: [s for s in d.state()["services"] if str(drop) in s["name"]])
    text = run_cli("daemon", "status").stdout
    assert "  services:" in text and any(str(drop) in line for line in text.splitlines() if line.startswith("    "))

    d.config.write_text(conf("[pools.io]\nsize = 0\njobs = [\"verify\"]\nbogus = 1\n"))
    d.proc.send_signal(signal.SIGHUP)
    wait_for("the refusal", lambda: "reload refused" in d.log())
    line = next(x for x in d.log().splitlines() if "reload refused" in x)
    assert "pools.io.size: 0 must be a whole number of at least 1" in line and "bogus: unknown key" in line
    time.sleep(1)  # nothing else happens: the running config stays
    assert len([w for w in d.workers() if w["alive"]]) == 2 and d.proc.poll() is None
    # What only the host can tell (an endpoint its worker config does not trust) refuses the reload too, whole.
    d.config.write_text(conf("[pools.io]\nsize = 2\njobs = [\"verify\"]\n"
                             "[[follow]]\nrepo = \"acme/tiny\"\nendpoint = \"https://mirror.example\"\n"))
    d.proc.send_signal(signal.SIGHUP)
    wait_for("the second refusal", lambda: d.log().count("reload refused") == 2)
    line = [x for x in d.log().splitlines() if "reload refused" in x][-1]
    assert "follow acme/tiny@main: endpoint https://mirror.example is not trusted" in line
    assert [s["name"] for s in d.state()["services"]] == [f"watch:{drop}"]  # the running config stays

    d.config.write_text(conf("[pools.io]\nsize = 1\njobs = [\"verify\"]\n"))
    d.proc.send_signal(signal.SIGHUP)
    wait_for("the pool to shrink", lambda: len(d.workers()) == 1 and not d.state()["retiring"])
    assert d.stop() == 0


# --- one daemon per SQLite home, any number on PostgreSQL -----------------------------------------------------

def test_second_daemon_is_refused_on_sqlite_and_welcome_on_postgresql(db_url, home, daemons):
    config = conf("[pools.io]\nsize = 1\njobs = [\"verify\"]\n")
    first = daemons(home, config)
    first.wait_workers(1)
    second = daemons(home, config)
    if db_url.startswith("sqlite"):
        assert second.proc.wait(TIMEOUT) == 1
        lines = second.log().strip().splitlines()
        assert lines == [f"error: another registry daemon (pid {first.proc.pid}) is running on {home}: a SQLite "
                         "catalog takes one daemon per home; stop that one first, or use a PostgreSQL catalog to "
                         "run several"]
    else:
        second.wait_workers(1)
        pids = {s["pid"] for s in cli_json("daemon", "status")["daemons"]}
        assert pids == {first.proc.pid, second.proc.pid}
        assert second.stop() == 0
    assert first.stop() == 0


# --- backoff --------------------------------------------------------------------------------------------------

def test_restart_backoff_doubles_up_to_its_maximum():
    from registry.daemon.pools import backoff_delay

    assert [backoff_delay(n, 1, 60) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert [backoff_delay(n, 0.2, 1) for n in range(1, 5)] == [0.2, 0.4, 0.8, 1]
