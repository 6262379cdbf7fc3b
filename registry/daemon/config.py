"""daemon.toml: the daemon's configuration, read and checked whole before anything starts.

Top-level keys and `[pools.<name>]` are checked here; `[[watch]]`, `[[follow]]`, `[[pipeline]]` and the
`[scrub]`/`[gc]`/`[prune]` schedules are handed to the parser of the module that owns each (imported when
needed, so a section's code loads only when the daemon starts). Every parser appends its problems to one list,
so a config with three mistakes gets three lines in one error (ConfigErrors, exit 2), not three restarts.
"""
from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BadInput
from ..schema import JOB_TYPES
from .options import ConfigErrors, check_keys, duration, positive_int, string_list

ML_JOBS = ("merge", "quantize", "convert")
LOG_FORMATS = ("text", "json")
TOP_KEYS = ("log_format", "metrics", "grace", "restart_backoff", "restart_backoff_max", "state_interval",
            "pools", "watch", "follow", "pipeline", "scrub", "gc", "prune")
POOL_KEYS = ("size", "jobs", "gpus", "lease", "poll")
SCHEDULE_TABLES = ("scrub", "gc", "prune")
DEFAULT_GRACE = 30.0
DEFAULT_LEASE = 60.0
DEFAULT_POLL = 10.0  # idle workers are woken by NOTIFY / data_version and for retries (jobs.seconds_until_due); this bounds the rest
_POOL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class PoolConfig:
    """One pool of `registry worker` processes running the same job types.

    gpus: None leaves CUDA_VISIBLE_DEVICES as the daemon has it; "none" hides every GPU from the workers;
    "auto" pins one worker per detected GPU (as a list would) or, with no GPU, runs `size` workers as None does;
    a tuple of device ids (indexes, or GPU-/MIG- UUIDs) pins worker i to gpus[i % len(gpus)].
    size: None means one worker per pinned GPU, else 1.
    """

    name: str
    jobs: tuple[str, ...]
    size: int | None = None
    gpus: str | tuple[str, ...] | None = None
    lease: float = DEFAULT_LEASE
    poll: float = DEFAULT_POLL


@dataclass
class DaemonConfig:
    source: str  # the file read, or "built-in defaults"
    pools: dict[str, PoolConfig]
    log_format: str = "text"
    metrics: tuple[str, int] | None = None
    grace: float = DEFAULT_GRACE
    restart_backoff: float = 1.0
    restart_backoff_max: float = 60.0
    state_interval: float = 5.0
    watches: list[Any] = field(default_factory=list)
    follows: list[Any] = field(default_factory=list)
    pipelines: list[Any] = field(default_factory=list)
    schedules: Any = None  # schedules.ScheduleConfig; None only where that module is not installed


@dataclass(frozen=True)
class Overrides:
    """The command line's flags, which win over the file (and are applied again on every reload)."""

    workers: int | None = None
    watch: tuple[str, ...] = ()
    metrics: str | None = None
    log_format: str | None = None
    grace: float | None = None


def default_pools() -> dict[str, PoolConfig]:
    """io: two workers for everything but merge, quantize and convert; compute: those, one per GPU."""
    return {"io": PoolConfig("io", tuple(t for t in JOB_TYPES if t not in ML_JOBS), size=2),
            "compute": PoolConfig("compute", ML_JOBS, gpus="auto")}


def config_path(home: Path, given: str | os.PathLike | None) -> Path | None:
    """The file to read: the one given (which must exist), else <home>/daemon.toml when it exists."""
    if given is not None:
        path = Path(given).expanduser()
        if not path.is_file():
            raise BadInput(f"config file {path} does not exist; give an existing file with --config, or leave "
                           f"--config out to use {home / 'daemon.toml'} (or the built-in defaults)")
        return path.absolute()
    default = home / "daemon.toml"
    return default if default.is_file() else None


def load(path: Path | None, overrides: Overrides = Overrides()) -> DaemonConfig:
    """The config from `path` (None: the defaults) with the overrides applied; ConfigErrors lists every problem."""
    source = str(path) if path is not None else "built-in defaults"
    data: dict[str, Any] = {}
    if path is not None:
        data = read_toml(path)
    return parse(data, source, overrides)


def read_toml(path: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigErrors([f"not valid TOML: {exc}"], str(path)) from None
    except OSError as exc:
        raise BadInput(f"cannot read {path}: {exc.strerror}") from None


def parse(data: dict[str, Any], source: str, overrides: Overrides = Overrides()) -> DaemonConfig:
    problems: list[str] = []
    check_keys(data, TOP_KEYS, "daemon.toml", problems)
    problems[:] = [p.replace("daemon.toml.", "", 1) for p in problems]  # "grce: unknown key", as sections say
    config = DaemonConfig(source=source, pools=default_pools())
    if "log_format" in data:
        config.log_format = _log_format(data["log_format"], "log_format", problems)
    if "metrics" in data:
        config.metrics = parse_address(data["metrics"], "metrics", problems)
    if "grace" in data:
        config.grace = _seconds_or_zero(data["grace"], "grace", problems)
    if "restart_backoff" in data:
        config.restart_backoff = duration(data["restart_backoff"], "restart_backoff", problems)
    if "restart_backoff_max" in data:
        config.restart_backoff_max = duration(data["restart_backoff_max"], "restart_backoff_max", problems)
    if config.restart_backoff_max < config.restart_backoff:
        problems.append(f"restart_backoff_max: {config.restart_backoff_max:g} s is less than restart_backoff "
                        f"({config.restart_backoff:g} s)")
    if "state_interval" in data:
        config.state_interval = duration(data["state_interval"], "state_interval", problems)
    if "pools" in data:
        config.pools = parse_pools(data["pools"], problems)
    _sections(data, config, problems)
    _apply(overrides, config, problems)
    if problems:
        raise ConfigErrors(problems, source)
    return config


def parse_pools(tables: Any, problems: list[str]) -> dict[str, PoolConfig]:
    pools: dict[str, PoolConfig] = {}
    if not isinstance(tables, dict):
        problems.append(f"pools: expected [pools.<name>] tables, got {type(tables).__name__}")
        return pools
    for name, table in tables.items():
        where = f"pools.{name}"
        if not _POOL_NAME.match(name):
            problems.append(f"{where}: a pool name is letters, digits, '_', '-' or '.' (at most 64)")
        table = check_keys(table, POOL_KEYS, where, problems, required=("jobs",))
        if not table:
            continue
        jobs = tuple(string_list(table.get("jobs", []), f"{where}.jobs", problems))
        unknown = [j for j in jobs if j not in JOB_TYPES]
        if unknown:
            problems.append(f"{where}.jobs: unknown job type(s) {', '.join(map(repr, unknown))}; "
                            f"job types: {', '.join(JOB_TYPES)}")
        elif "jobs" in table and not jobs:
            problems.append(f"{where}.jobs: empty; list the job types this pool runs")
        size = positive_int(table["size"], f"{where}.size", problems) if "size" in table else None
        gpus = _gpus(table["gpus"], f"{where}.gpus", problems) if "gpus" in table else None
        lease = duration(table["lease"], f"{where}.lease", problems, minimum=1) if "lease" in table else DEFAULT_LEASE
        poll = duration(table["poll"], f"{where}.poll", problems) if "poll" in table else DEFAULT_POLL
        pools[name] = PoolConfig(name, tuple(dict.fromkeys(jobs)), size, gpus, lease, poll)
    return pools


def parse_address(value: Any, where: str, problems: list[str]) -> tuple[str, int] | None:
    """("127.0.0.1", 9464) from "127.0.0.1:9464", ":9464" (every interface) or "[::1]:9464"."""
    text = value if isinstance(value, str) else ""
    host, colon, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not colon or not port.isdigit() or not 0 < int(port) < 65536 or ("[" in host or "]" in host):
        problems.append(f"{where}: {value!r} is not HOST:PORT; write e.g. \"127.0.0.1:9464\" or \":9464\"")
        return None
    return host or "0.0.0.0", int(port)


def _log_format(value: Any, where: str, problems: list[str]) -> str:
    if value not in LOG_FORMATS:
        problems.append(f"{where}: {value!r} must be one of {', '.join(LOG_FORMATS)}")
        return "text"
    return value


def _seconds_or_zero(value: Any, where: str, problems: list[str]) -> float:
    if not isinstance(value, bool) and value == 0:
        return 0.0
    return duration(value, where, problems)


def _gpus(value: Any, where: str, problems: list[str]) -> str | tuple[str, ...] | None:
    if value in ("auto", "none"):
        return value
    ids = value if isinstance(value, list) else None
    if ids is None or not ids or not all((isinstance(i, int) and not isinstance(i, bool) and i >= 0)
                                         or (isinstance(i, str) and re.fullmatch(r"[A-Za-z0-9-]+", i))
                                         for i in ids):
        problems.append(f"{where}: {value!r} must be \"auto\", \"none\" or a list of GPU indexes or UUIDs, "
                        "e.g. [0, 1]")
        return None
    devices = tuple(str(i) for i in ids)
    if len(set(devices)) != len(devices):
        problems.append(f"{where}: {value!r} names a GPU twice")
    return devices


def _section_module(name: str, section: str, problems: list[str]):
    """registry.daemon.<name>, or None (and a problem) where this installation lacks it."""
    try:
        return importlib.import_module(f"registry.daemon.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"registry.daemon.{name}":
            raise
        if section:
            problems.append(f"{section}: this installation of registry has no {name} support")
        return None


def _sections(data: dict[str, Any], config: DaemonConfig, problems: list[str]) -> None:
    """Each section to its owner's parser; a section the file lacks is an empty list (no schedules: defaults)."""
    for key, module, parser, attr in (("watch", "watch", "parse_watches", "watches"),
                                      ("follow", "follow", "parse_follows", "follows"),
                                      ("pipeline", "pipelines", "parse_pipelines", "pipelines")):
        if key in data:
            owner = _section_module(module, key, problems)
            if owner is not None:
                setattr(config, attr, getattr(owner, parser)(data[key], problems))
    tables = {k: data[k] for k in SCHEDULE_TABLES if k in data}
    owner = _section_module("schedules", ", ".join(tables), problems)
    if owner is not None:
        config.schedules = owner.parse_schedules(tables, problems)


def _apply(overrides: Overrides, config: DaemonConfig, problems: list[str]) -> None:
    if overrides.workers is not None:
        config.pools = {"all": PoolConfig("all", JOB_TYPES, size=overrides.workers)}
    if overrides.watch:
        owner = _section_module("watch", "--watch", problems)
        if owner is not None:
            found: list[str] = []
            extra = owner.parse_watches([{"path": os.path.abspath(d)} for d in overrides.watch], found)
            problems.extend(p.replace("watch[", "--watch[") for p in found)
            for w in extra:  # a folder the file watches too would have two watches (a drop and a training one)
                for i, other in enumerate(config.watches):
                    if owner.overlap(w.path, other.path):
                        problems.append(f"--watch {w.path}: overlaps watch[{i}].path ({other.path}) of the config "
                                        "file; watch each folder once")
            config.watches = [*config.watches, *extra]
    if overrides.metrics is not None:
        config.metrics = parse_address(overrides.metrics, "--metrics", problems)
    if overrides.log_format is not None:
        config.log_format = _log_format(overrides.log_format, "--log-format", problems)
    if overrides.grace is not None:
        config.grace = overrides.grace

