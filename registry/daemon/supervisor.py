"""`registry daemon`: the supervisor. One process per host that keeps its worker pools at size, runs the
services (each in a thread of its own) and the metrics server, and reports its state.

- A worker that dies is restarted after a backoff (restart_backoff, doubling up to restart_backoff_max), and
  the leases of its jobs are expired at once (its process is known dead), so another worker takes its job now
  instead of when the lease runs out.
- SIGTERM/SIGINT drain: the services stop, every worker gets one SIGTERM and finishes its job within `grace`
  (past that it re-queues the job itself), then the daemon exits 0. SIGHUP reloads the config; a config with
  problems is logged and the running one kept.
- On a SQLite catalog one daemon per home (an flock on <home>/daemon/lock); on PostgreSQL any number.
The main thread does all process work (workers are started from it, so Linux's PR_SET_PDEATHSIG, which fires
when the *thread* that started a child ends, fires only when the daemon ends); signal handlers only set flags.
"""
from __future__ import annotations

import importlib
import logging
import os
import signal
import socket
import threading
import time
from typing import Any, Callable

from .. import jobs
from ..core import Registry
from ..db import is_sqlite
from ..errors import OperationFailed, RegistryError
from ..schema import JOB_TYPES
from . import logs, state
from .config import DaemonConfig
from .options import ConfigErrors
from .pools import WorkerSlot, detect_gpus, pool_specs

log = logging.getLogger("registry.daemon")
TICK_SECONDS = 0.25  # how soon a dead worker is noticed (and its jobs handed on), and signals acted upon
KILL_MARGIN_SECONDS = 15.0  # after `grace`: time for workers to record the re-queue before SIGKILL
SERVICE_STOP_SECONDS = 10.0


class Supervisor:
    def __init__(self, reg: Registry, config: DaemonConfig, load_config: Callable[[], DaemonConfig],
                 debug: bool = False):
        self.reg, self.config, self._load_config, self.debug = reg, config, load_config, debug
        self.pid = os.getpid()
        self.host = jobs.this_host()
        self.started_at = time.time()
        self.loop_at: float | None = None
        self.phase = "starting"
        self.pools: dict[str, list[WorkerSlot]] = {}
        self.retiring: list[WorkerSlot] = []  # replaced or removed by a reload, finishing their jobs
        self.services: dict[tuple[str, str], tuple[list[Any], list[threading.Thread], threading.Event]] = {}
        self.metrics_server: Any = None
        self.state_file = state.state_path(reg.home)
        self._lock = threading.RLock()  # pools and services change in the main thread; snapshot() reads anywhere
        self._wake = threading.Event()
        self._stops = 0
        self._reload = False
        self._expire_pids: set[int] = set()
        self._lock_file = None

    # --- what others read -------------------------------------------------------------------------------

    def alive(self) -> bool:
        return self.phase == "running"

    def snapshot(self) -> dict[str, Any]:
        """{"pid", "started_at", "pools": {name: {"size", "jobs", "workers": [{"pid", "gpu", "restarts",
        "alive", "last_exit"}]}}, "services": [status(), ...]} plus host, phase, loop_at and the settings."""
        with self._lock:
            pools = {name: {"size": len(slots), "jobs": list(slots[0].spec.jobs) if slots else [],
                            "workers": [slot.snapshot() for slot in slots]} for name, slots in self.pools.items()}
            services = [svc.status() for group, _, _ in self.services.values() for svc in group]
            retiring = [{**slot.snapshot(), "pool": slot.spec.pool} for slot in self.retiring]
        cfg = self.config
        return {"pid": self.pid, "host": self.host, "hostname": socket.gethostname(), "phase": self.phase,
                "started_at": self.started_at, "loop_at": self.loop_at, "home": str(self.reg.home),
                "config": cfg.source, "grace": cfg.grace, "state_interval": cfg.state_interval,
                "metrics": _address(cfg.metrics), "log_format": cfg.log_format,
                "pools": pools, "retiring": retiring, "services": services}

    # --- the life of the daemon -------------------------------------------------------------------------

    def run(self) -> int:
        """Start everything, supervise until SIGTERM/SIGINT, drain; returns the exit code (0)."""
        self._take_lock()
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        state.remove_dead_files(self.reg.home, self.host)
        self._take_over_jobs_of_dead_processes()
        self._install_signals()
        try:
            self._start_metrics(self.config)
            self._apply_pools(self.config)
            self._apply_services(self.config, at_start=True)
            self.phase = "running"
            self._start_due_workers()
            self._write_state()
            log.info("daemon started (pid %s, config: %s): %s", self.pid, self.config.source, self._summary())
            sd_notify("READY=1\nSTATUS=" + self._summary())
            self._loop()
        finally:
            self._drain()
        return 0

    def _loop(self) -> None:
        next_state = 0.0
        while not self._stops:
            self.loop_at = time.time()
            if self._reload:
                self._reload = False
                self._do_reload()
            changed = self._reap()
            changed = self._start_due_workers() or changed
            self._expire_leases_of_dead()
            if changed or time.monotonic() >= next_state:
                self._write_state()
                next_state = time.monotonic() + self.config.state_interval
            self._wake.wait(TICK_SECONDS)
            self._wake.clear()

    def _install_signals(self) -> None:
        def stop(signum, _frame) -> None:
            self._stops += 1
            self._wake.set()

        def reload(_signum, _frame) -> None:
            self._reload = True
            self._wake.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, reload)

    def _take_lock(self) -> None:
        """One daemon per SQLite home: two would run two sets of pools and services against one file."""
        if not is_sqlite(self.reg.settings.database_url):
            return
        import fcntl

        path = self.reg.home / "daemon" / "lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+")  # not inherited by the workers (PEP 446), so it dies with this process
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            other = handle.read().strip() or "?"
            handle.close()
            raise OperationFailed(f"another registry daemon (pid {other}) is running on {self.reg.home}: a SQLite "
                                  "catalog takes one daemon per home; stop that one first, or use a PostgreSQL "
                                  "catalog to run several") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{self.pid}\n")
        handle.flush()
        self._lock_file = handle

    def _take_over_jobs_of_dead_processes(self) -> None:
        """Jobs still leased to processes of this host that are gone (a worker of a daemon killed with -9 that
        was killed too): claimable now, not when their leases run out."""
        from sqlalchemy import select

        from ..models import Job

        with self.reg.session() as s:
            owned_here = select(Job).where(Job.state == "running",
                                           Job.lease_owner.startswith(f"{self.host}:", autoescape=True))
            taken = [job.id for job in s.scalars(owned_here) if jobs.owner_is_dead(job.lease_owner)]
            for job_id in taken:
                jobs.expire_lease(s, job_id)
        if taken:
            log.info("job(s) %s of processes that died on this host are claimable again", _ids(taken))

    # --- worker pools -------------------------------------------------------------------------------------

    def _all_slots(self) -> list[WorkerSlot]:
        return [slot for slots in self.pools.values() for slot in slots]

    def _apply_pools(self, config: DaemonConfig) -> None:
        """Make the pools what `config` says: a worker whose spec is unchanged stays; one no longer wanted
        (a smaller pool, other job types or GPU) gets SIGTERM and finishes its job first (`retiring`)."""
        detected = detect_gpus() if any(p.gpus == "auto" for p in config.pools.values()) else []
        wanted = {name: pool_specs(pool, detected) for name, pool in config.pools.items()}
        with self._lock:
            new: dict[str, list[WorkerSlot]] = {}
            for name, specs in wanted.items():
                old = self.pools.get(name, [])
                new[name] = [old[i] if i < len(old) and old[i].spec == spec else WorkerSlot(spec)
                             for i, spec in enumerate(specs)]
            kept = {id(slot) for slots in new.values() for slot in slots}
            for slot in self._all_slots():
                if id(slot) not in kept:
                    self._retire(slot)
            self.pools = new
        if not new:
            log.warning("no worker pools: this daemon runs no jobs (workers elsewhere must run them)")
        covered = {t for pool in config.pools.values() for t in pool.jobs}
        missing = [t for t in JOB_TYPES if t not in covered] if new else []
        if missing:
            log.info("no pool here runs %s jobs; they wait for workers elsewhere", ", ".join(missing))

    def _retire(self, slot: WorkerSlot) -> None:
        if slot.alive():
            slot.signal(signal.SIGTERM)
            self.retiring.append(slot)
            log.info("pool %s: worker pid %s stops after its current job (config changed)", slot.spec.pool, slot.pid)

    def _reap(self) -> bool:
        """Notice workers that exited; returns whether any did."""
        changed = False
        for slot in self._all_slots():
            if slot.proc is not None and slot.proc.poll() is not None:
                pid = slot.proc.pid
                delay = slot.exited(self.config.restart_backoff, self.config.restart_backoff_max)
                slot.proc = None
                self._expire_pids.add(pid)
                log.warning("pool %s: worker pid %s died (%s); restarting it in %gs", slot.spec.pool, pid,
                            slot.last_exit, delay)
                changed = True
        for slot in list(self.retiring):
            if not slot.alive():
                self.retiring.remove(slot)
                self._expire_pids.add(slot.pid)
                log.info("pool %s: worker pid %s stopped (%s)", slot.spec.pool, slot.pid, _exit(slot.proc))
                changed = True
        return changed

    def _start_due_workers(self) -> bool:
        if self.phase != "running":
            return False
        env = {**os.environ, "REGISTRY_HOME": str(self.reg.home),
               "REGISTRY_DATABASE_URL": self.reg.settings.database_url}  # in the environment: not shown by ps
        started = False
        now = time.monotonic()
        for slot in self._all_slots():
            if slot.proc is None and now >= slot.start_after:
                restarting = slot.last_exit is not None
                try:
                    with self._lock:
                        slot.start(env, self.config.grace, self.debug)
                except OSError as exc:
                    slot.start_after = now + self.config.restart_backoff_max
                    log.error("pool %s: cannot start a worker: %s", slot.spec.pool, exc)
                    continue
                slot.restarts += restarting
                started = True
        return started

    def _expire_leases_of_dead(self) -> None:
        """Hand the jobs of workers that died to the others at once (retried while the database is away)."""
        for pid in sorted(self._expire_pids):
            try:
                with self.reg.session() as s:
                    taken = jobs.expire_leases_of_process(s, pid)
            except Exception as exc:  # noqa: BLE001 - the catalog is unreachable: try again next tick
                log.warning("could not hand on the jobs of worker pid %s yet: %s", pid, exc)
                return
            self._expire_pids.discard(pid)
            if taken:
                log.info("job(s) %s of worker pid %s are claimable again", _ids(taken), pid)

    # --- services and metrics -----------------------------------------------------------------------------

    def _apply_services(self, config: DaemonConfig, at_start: bool = False) -> None:
        wanted = wanted_services(self.reg, config)
        for key in [k for k in self.services if k not in wanted]:
            self._stop_services([key])
        for key, make in wanted.items():
            if key in self.services:
                continue
            try:
                made = make()
            except Exception as exc:
                if at_start:
                    raise
                log.error("%s: could not start: %s", key[0], exc)
                continue
            stopping = threading.Event()
            threads = [threading.Thread(target=svc.run, args=(stopping,), daemon=True, name=f"service-{svc.name}")
                       for svc in made]
            with self._lock:
                self.services[key] = (made, threads, stopping)
            for thread in threads:
                thread.start()

    def _stop_services(self, keys: list[tuple[str, str]]) -> None:
        groups = []
        with self._lock:
            for key in keys:
                groups.append(self.services.pop(key))
        for made, _, stopping in groups:
            stopping.set()
            for svc in made:
                svc.wake()
        deadline = time.monotonic() + SERVICE_STOP_SECONDS
        for made, threads, _ in groups:
            for svc, thread in zip(made, threads):
                thread.join(max(0.0, deadline - time.monotonic()))
                if thread.is_alive():
                    log.warning("service %s did not stop within %gs", svc.name, SERVICE_STOP_SECONDS)

    def _start_metrics(self, config: DaemonConfig) -> None:
        if config.metrics is None:
            return
        try:
            metrics = importlib.import_module("registry.daemon.metrics")
        except ModuleNotFoundError as exc:
            if exc.name != "registry.daemon.metrics":
                raise
            log.error("metrics: this installation of registry has no metrics support; not serving %s",
                      _address(config.metrics))
            return
        self.metrics_server = metrics.serve(self, *config.metrics)

    def _stop_metrics(self) -> None:
        server, self.metrics_server = self.metrics_server, None
        if server is not None:
            for name in ("close", "shutdown"):
                if callable(getattr(server, name, None)):
                    getattr(server, name)()
                    break

    # --- reload and drain ---------------------------------------------------------------------------------

    def _do_reload(self) -> None:
        log.info("SIGHUP: reloading the config (%s)", self.config.source)
        sd_notify("RELOADING=1")
        try:
            new = self._load_config()
            check_services(self.reg, new)
        except RegistryError as exc:
            problems = getattr(exc, "problems", None) or [str(exc)]
            log.error("reload refused, the running config stays: %s", "; ".join(problems))
            sd_notify("READY=1")
            return
        old = self.config
        logs.set_format(new.log_format)
        self.config = new
        self._apply_pools(new)
        self._apply_services(new)
        if new.metrics != old.metrics:
            self._stop_metrics()
            try:
                self._start_metrics(new)
            except RegistryError as exc:
                log.error("%s", exc)
        self._write_state()
        log.info("config reloaded: %s", self._summary())
        sd_notify("READY=1\nSTATUS=" + self._summary())

    def _drain(self) -> None:
        """Stop the services, then every worker (each finishes its job within `grace` or re-queues it)."""
        started, self.phase = self.phase == "running", "draining"
        sd_notify("STOPPING=1")
        grace = self.config.grace
        if started:
            log.info("stopping: services first, then workers (their jobs may take %gs to finish)", grace)
        self._stop_services(list(self.services))
        workers = [slot for slot in [*self._all_slots(), *self.retiring] if slot.alive()]
        for slot in workers:
            slot.signal(signal.SIGTERM)
        self._write_state()
        forwarded = self._stops
        deadline = time.monotonic() + grace + KILL_MARGIN_SECONDS
        while any(slot.alive() for slot in workers) and time.monotonic() < deadline:
            if self._stops > forwarded:  # asked again: stop now, workers re-queue their jobs
                forwarded = self._stops
                log.warning("stopping now: running jobs go back to the queue")
                for slot in workers:
                    slot.signal(signal.SIGTERM)
            self._wake.wait(0.1)
            self._wake.clear()
        for slot in workers:
            if slot.alive():
                log.error("pool %s: worker pid %s did not stop; killing it", slot.spec.pool, slot.pid)
                slot.signal(signal.SIGKILL)
                slot.proc.wait()
            else:
                log.info("pool %s: worker pid %s stopped (%s)", slot.spec.pool, slot.pid, _exit(slot.proc))
            self._expire_pids.add(slot.pid)
        self._expire_leases_of_dead()
        self._stop_metrics()
        self.state_file.unlink(missing_ok=True)
        if self._lock_file is not None:
            self._lock_file.close()
        if started:
            log.info("daemon stopped")

    # --- reporting ----------------------------------------------------------------------------------------

    def _write_state(self) -> None:
        try:
            state.write(self.state_file, self.snapshot())
        except OSError as exc:
            log.warning("cannot write %s: %s", self.state_file, exc.strerror)

    def _summary(self) -> str:
        pools = ", ".join(f"{name} x{len(slots)}" for name, slots in self.pools.items()) or "no pools"
        count = sum(len(made) for made, _, _ in self.services.values())
        return f"pools {pools}; {count} service(s)"


def wanted_services(reg: Registry, config: DaemonConfig) -> dict[tuple[str, str], Callable[[], list[Any]]]:
    """Each configured item keyed by its kind and value, with the factory that makes its service(s): a
    reload keeps the services of unchanged items running (their in-memory state, e.g. quiet timers)."""
    wanted: dict[tuple[str, str], Callable[[], list[Any]]] = {}
    for items, module, factory in ((config.watches, "watch", "watch_services"),
                                   (config.follows, "follow", "follow_services"),
                                   (config.pipelines, "pipelines", "pipeline_services")):
        for item in items:
            wanted[(module, repr(item))] = _factory(module, factory, reg, [item])
    if config.schedules is not None:
        wanted[("schedules", repr(config.schedules))] = _factory("schedules", "schedule_services", reg,
                                                                 config.schedules)
    return wanted


def check_services(reg: Registry, config: DaemonConfig) -> None:
    """What only this host can tell about the config (a watch or calibration file outside the workers'
    allowed_roots, a follow endpoint its worker config does not trust): every problem at once, as ConfigErrors,
    before anything starts (and for --check, and before a reload is applied). Making a service starts nothing."""
    problems: list[str] = []
    for make in wanted_services(reg, config).values():
        try:
            make()
        except ConfigErrors as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigErrors(problems, config.source)


def _factory(module: str, name: str, reg: Registry, arg: Any) -> Callable[[], list[Any]]:
    return lambda: list(getattr(importlib.import_module(f"registry.daemon.{module}"), name)(reg, arg))


def _address(address: tuple[str, int] | None) -> str | None:
    if address is None:
        return None
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _exit(proc) -> str:
    code = proc.returncode if proc is not None else None
    return "?" if code is None else f"killed by signal {-code}" if code < 0 else f"exit code {code}"


def _ids(ids: list[int]) -> str:
    return ", ".join(str(i) for i in ids)


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) we are ready, reloading or stopping; nothing when not run by systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.debug("sd_notify failed: %s", exc)


def run_daemon(reg: Registry, config: DaemonConfig, load_config: Callable[[], DaemonConfig],
               debug: bool = False) -> int:
    logs.setup(config.log_format, debug)
    reg.init()
    return Supervisor(reg, config, load_config, debug).run()

