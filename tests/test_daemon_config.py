"""daemon.toml (issue 10): defaults, every problem listed at once with nothing started, command-line overrides,
GPU detection and pinning, and the deployment files (systemd unit, docker-compose service)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import run_cli
from registry.daemon import config as dconfig
from registry.daemon.options import ConfigErrors
from registry.daemon.pools import detect_gpus, parse_nvidia_smi, worker_gpus
from registry.schema import JOB_TYPES

ROOT = Path(__file__).resolve().parent.parent


def parse(text: str, **overrides) -> dconfig.DaemonConfig:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    return dconfig.parse(tomllib.loads(text), "daemon.toml", dconfig.Overrides(**overrides))


def problems_of(text: str, **overrides) -> list[str]:
    with pytest.raises(ConfigErrors) as caught:
        parse(text, **overrides)
    return caught.value.problems


def test_defaults_without_a_file():
    config = dconfig.load(None)
    assert config.source == "built-in defaults"
    io, compute = config.pools["io"], config.pools["compute"]
    assert io.size == 2 and set(io.jobs) == set(JOB_TYPES) - {"merge", "quantize", "convert"}
    assert (compute.jobs, compute.size, compute.gpus) == (("merge", "quantize", "convert"), None, "auto")
    assert (config.log_format, config.metrics, config.grace) == ("text", None, 30.0)
    assert (config.restart_backoff, config.restart_backoff_max) == (1.0, 60.0)
    assert config.watches == config.follows == config.pipelines == []
    schedules = config.schedules
    assert schedules.scrub.every == 86400 and schedules.prune.every == 86400 and schedules.gc is None


def test_a_full_config_parses():
    config = parse('log_format = "json"\nmetrics = ":9464"\ngrace = "2m"\nrestart_backoff = 0.5\n'
                   'restart_backoff_max = "10s"\nstate_interval = "1s"\n'
                   '[pools.io]\nsize = 3\njobs = ["pull", "import", "pull"]\nlease = "2m"\npoll = 0.5\n'
                   '[pools.gpu]\njobs = ["merge", "quantize"]\ngpus = [0, "GPU-8f2a"]\n[gc]\nevery = "7d"\n')
    assert (config.log_format, config.metrics, config.grace) == ("json", ("0.0.0.0", 9464), 120.0)
    assert (config.restart_backoff, config.restart_backoff_max, config.state_interval) == (0.5, 10.0, 1.0)
    assert config.pools["io"] == dconfig.PoolConfig("io", ("pull", "import"), 3, None, 120.0, 0.5)
    assert config.pools["gpu"].gpus == ("0", "GPU-8f2a") and set(config.pools) == {"io", "gpu"}
    assert config.schedules.gc.every == 7 * 86400
    assert parse('metrics = "[::1]:9464"\ngrace = 0').metrics == ("::1", 9464)


def test_every_problem_is_listed_at_once():
    found = problems_of('grce = 3\nlog_format = "xml"\nmetrics = "localhost"\nrestart_backoff = "soon"\n'
                        '[pools.io]\nsize = 0\njobs = ["import", "compile"]\nthreads = 4\n'
                        '[pools.gpu]\njobs = ["merge"]\ngpus = [0, 0]\n[pools.empty]\nsize = 1\n'
                        '[pools.odd]\njobs = []\ngpus = "some"\n')
    expected = [
        "grce: unknown key; known keys: ",
        "log_format: 'xml' must be one of text, json",
        "metrics: 'localhost' is not HOST:PORT",
        "restart_backoff: 'soon' is not a duration",
        "pools.io.threads: unknown key; known keys: gpus, jobs, lease, poll, size",
        "pools.io.jobs: unknown job type(s) 'compile'",
        "pools.io.size: 0 must be a whole number of at least 1",
        "pools.gpu.gpus: [0, 0] names a GPU twice",
        "pools.empty.jobs: required",
        "pools.odd.jobs: empty; list the job types this pool runs",
        "pools.odd.gpus: 'some' must be \"auto\", \"none\" or a list of GPU indexes or UUIDs",
    ]
    for start in expected:
        assert any(p.startswith(start) for p in found), (start, found)
    assert len(found) == len(expected), found


def test_sections_go_to_their_owners_and_their_problems_are_listed_too(tmp_path):
    found = problems_of(f'[[watch]]\npath = "{tmp_path / "missing"}"\n[[follow]]\nbogus = 1\n'
                        '[scrub]\nbandwidth = "fast"\n[pools.io]\nsize = 0\njobs = ["pull"]\n')
    assert any(p.startswith("watch[0].path:") for p in found)
    assert any(p.startswith("follow[0]") for p in found)
    assert any(p.startswith("scrub.bandwidth:") for p in found)
    assert any(p.startswith("pools.io.size:") for p in found)


def test_command_line_flags_override_the_file(tmp_path):
    drop = tmp_path / "drop"
    drop.mkdir()
    config = parse('log_format = "json"\nmetrics = "127.0.0.1:1"\ngrace = 5\n[pools.io]\njobs = ["pull"]\n',
                   workers=3, watch=(str(drop),), metrics="127.0.0.1:9000", log_format="text", grace=0.0)
    assert config.pools == {"all": dconfig.PoolConfig("all", JOB_TYPES, 3)}
    assert [w.path for w in config.watches] == [drop] and config.watches[0].mode == "drop"
    assert (config.metrics, config.log_format, config.grace) == (("127.0.0.1", 9000), "text", 0.0)
    found = problems_of("", watch=(str(tmp_path / "nope"),), metrics="9000")
    assert any(p.startswith("--watch[0].path:") and "nope" in p for p in found)
    assert any(p.startswith("--metrics: '9000' is not HOST:PORT") for p in found)
    # A --watch inside (or equal to) a folder the file watches would be a second watch on it.
    (drop / "checkpoint-1").mkdir()
    found = problems_of(f'[[watch]]\npath = "{drop}"\nmode = "training"\n', watch=(str(drop / "checkpoint-1"),))
    assert found == [f"--watch {drop / 'checkpoint-1'}: overlaps watch[0].path ({drop}) of the config file; "
                     "watch each folder once"]


# --- through the CLI: exit 2 and nothing started -----------------------------------------------------------------

def test_a_bad_config_exits_2_listing_every_problem_and_starts_nothing(home, tmp_path):
    bad = tmp_path / "daemon.toml"
    bad.write_text('grce = 3\n[pools.io]\nsize = 0\njobs = ["import"]\n')
    proc = run_cli("daemon", "--config", str(bad), check=2, timeout=60)
    lines = proc.stderr.splitlines()
    assert lines[0] == f"error: {bad}: 2 problem(s); fix them and start again:" and len(lines) == 3
    assert lines[1].startswith("  grce: unknown key; known keys: follow, gc, grace, log_format, metrics, pipeline")
    assert lines[2] == "  pools.io.size: 0 must be a whole number of at least 1"
    assert not home.exists()  # no catalog, no lock, no state file, no worker
    bad.write_text("[pools.io\nsize = 1\n")
    proc = run_cli("daemon", "--config", str(bad), check=2, timeout=60)
    assert "not valid TOML" in proc.stderr and "line 1" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("daemon", "--config", str(tmp_path / "absent.toml"), check=2, timeout=60)
    assert proc.stderr.startswith(f"error: config file {tmp_path / 'absent.toml'} does not exist") \
        and len(proc.stderr.splitlines()) == 1
    proc = run_cli("daemon", "--workers", "2", "status", check=2, timeout=60)
    assert proc.stderr.startswith("error: --workers belongs to `registry daemon` itself")


def test_check_prints_what_would_run(home, tmp_path):
    (home).mkdir(parents=True)
    (home / "daemon.toml").write_text('[pools.gpu]\njobs = ["quantize"]\ngpus = [0, 1]\nsize = 3\n')
    drop = tmp_path / "drop"
    drop.mkdir()
    out = run_cli("daemon", "--check", "--watch", str(drop), timeout=60).stdout
    assert out.splitlines()[:3] == [f"config ok: {home / 'daemon.toml'}",
                                    "pool gpu: 3 worker(s) for quantize; GPUs 0, 1, 0", f"watch: {drop}"]
    out = run_cli("daemon", "--check", "--workers", "2", "--metrics", "127.0.0.1:9464", timeout=60).stdout
    assert f"pool all: 2 worker(s) for {', '.join(JOB_TYPES)}" in out and "metrics 127.0.0.1:9464" in out
    # What only this host can tell (the workers' allowed roots, trusted endpoints) is checked by --check too,
    # every problem at once, as a start would.
    (home / "config.toml").write_text(f'[paths]\nallowed_roots = ["{tmp_path / "models"}"]\n')
    (home / "daemon.toml").write_text('[[follow]]\nrepo = "acme/tiny"\nendpoint = "https://mirror.example"\n')
    lines = run_cli("daemon", "--check", "--watch", str(drop), check=2, timeout=60).stderr.splitlines()
    assert lines[0] == f"error: {home / 'daemon.toml'}: 2 problem(s); fix them and start again:"
    assert lines[1].startswith(f"  watch folder {drop} is outside this worker's allowed roots")
    assert lines[2].startswith("  follow acme/tiny@main: endpoint https://mirror.example is not trusted")


# --- GPUs ------------------------------------------------------------------------------------------------------

def test_gpus_come_from_cuda_visible_devices_then_nvidia_smi(tmp_path):
    assert detect_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert detect_gpus({"CUDA_VISIBLE_DEVICES": ""}) == [] == detect_gpus({"CUDA_VISIBLE_DEVICES": "-1"})
    assert detect_gpus({"CUDA_VISIBLE_DEVICES": "0,-1,1"}) == ["0"]  # CUDA stops at the first invalid id
    assert detect_gpus({"PATH": str(tmp_path)}) == []  # no nvidia-smi: no GPU
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\n[ \"$1\" = -L ] && printf 'GPU 0: NVIDIA H100 (UUID: GPU-aaa)\\n"
                    "GPU 1: NVIDIA H100 (UUID: GPU-bbb)\\n'\n")
    fake.chmod(0o755)
    assert detect_gpus({"PATH": str(tmp_path)}) == ["0", "1"]


def test_mig_instances_are_named_by_uuid():
    listing = ("GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-5d5ba0d6)\n"
               "  MIG 3g.20gb     Device  0: (UUID: MIG-c6d4f1ef-42e4-5de3-91c7-45d71c87eb3f)\n"
               "  MIG 3g.20gb     Device  1: (UUID: MIG-cba663e8-9bed-5b25-b243-5985ef7c9beb)\n"
               "GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-6e6cb1e7)\n")
    assert parse_nvidia_smi(listing) == ["MIG-c6d4f1ef-42e4-5de3-91c7-45d71c87eb3f",
                                         "MIG-cba663e8-9bed-5b25-b243-5985ef7c9beb", "1"]


def test_each_worker_of_a_gpu_pool_gets_its_gpu():
    pool = dconfig.PoolConfig
    assert worker_gpus(pool("g", ("merge",), gpus=("0", "1")), []) == ["0", "1"]
    assert worker_gpus(pool("g", ("merge",), size=3, gpus=("0", "1")), []) == ["0", "1", "0"]
    assert worker_gpus(pool("g", ("merge",), size=1, gpus=("0", "1")), []) == ["0"]
    assert worker_gpus(pool("g", ("merge",), gpus="auto"), ["0", "1", "2"]) == ["0", "1", "2"]
    assert worker_gpus(pool("g", ("merge",), gpus="auto"), []) == [None]  # no GPU: one unpinned worker
    assert worker_gpus(pool("g", ("merge",), size=2, gpus="none"), ["0"]) == ["", ""]  # hidden
    assert worker_gpus(pool("io", ("pull",), size=2), ["0"]) == [None, None]  # as the daemon sees them


# --- deployment files -------------------------------------------------------------------------------------------

def _unit() -> dict[str, str]:
    unit: dict[str, str] = {}
    for line in (ROOT / "docs" / "registry-daemon.service").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            unit[key.strip()] = value.strip()
    return unit


def _seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+)(s|min)?", text)
    return int(match.group(1)) * (60 if match.group(2) == "min" else 1)


def test_systemd_unit_stops_the_daemon_after_its_drain():
    unit = _unit()
    grace = float(re.search(r"--grace (\d+)", unit["ExecStart"]).group(1))
    assert unit["Type"] == "notify" and unit["KillSignal"] == "SIGTERM" and unit["KillMode"] == "mixed"
    assert _seconds(unit["TimeoutStopSec"]) > grace + 15 + 10  # grace, re-queue margin, services
    assert unit["ExecReload"] == "/bin/kill -HUP $MAINPID" and unit["RestartPreventExitStatus"] == "2"
    assert " daemon " in unit["ExecStart"]
    if shutil.which("systemd-analyze"):
        proc = subprocess.run(["systemd-analyze", "verify", str(ROOT / "docs" / "registry-daemon.service")],
                              capture_output=True, text=True)
        assert "Unknown key" not in proc.stderr and "Invalid" not in proc.stderr, proc.stderr


def test_docker_compose_runs_the_daemon_with_a_stop_grace_period_longer_than_the_drain():
    import yaml

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    daemon = compose["services"]["daemon"]
    grace = float(daemon["command"][daemon["command"].index("--grace") + 1])
    assert daemon["command"][:2] == ["registry", "daemon"] and daemon.get("stop_signal", "SIGTERM") == "SIGTERM"
    assert _seconds(daemon["stop_grace_period"]) > grace + 15 + 10
    if not shutil.which("docker-compose"):
        pytest.skip("docker-compose is not installed: the file was checked as YAML only")
    proc = subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config", "--quiet"],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "COMPOSE_PROJECT_NAME": "t"})
    assert proc.returncode == 0, proc.stderr


def test_non_finite_durations_and_rates_are_refused():
    from registry.daemon.options import byte_rate, duration

    problems: list[str] = []
    for value in (float("nan"), float("inf"), 1e400, "1e400"):
        duration(value, "scrub.every", problems)
    byte_rate(float("inf"), "scrub.bandwidth", problems)
    assert len(problems) == 5 and all("scrub." in p for p in problems)
    assert duration("90m", "x", problems) == 5400 and len(problems) == 5
