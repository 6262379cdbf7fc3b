"""The daemon's /metrics, /healthz and /status (registry/daemon/metrics.py), read as Prometheus and a load
balancer would: over HTTP, parsed with prometheus_client's own parser, on SQLite and PostgreSQL."""
from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta

import pytest
from conftest import REGISTRY_BIN, _drop_pg_database
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import insert, select
from sqlalchemy.engine import make_url

from registry import Registry, jobs
from registry.daemon.config import parse as parse_config
from registry.daemon.metrics import serve
from registry.daemon.supervisor import Supervisor
from registry.db import dispose_all
from registry.errors import BadInput
from registry.models import Blob, Job
from registry.workers import worker_loop


def supervisor_of(reg: Registry) -> Supervisor:
    """The real supervisor with the default config, not started: no workers or services (the daemon test below
    runs the whole daemon); its snapshot is what metrics.py reads."""
    config = parse_config({}, "built-in defaults")
    return Supervisor(reg, config, lambda: config)


def write_model(folder, seed: int) -> int:
    """A small valid model folder; returns its byte count."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "seed": seed}))
    raw = json.dumps({"w": {"dtype": "U8", "shape": [4096], "data_offsets": [0, 4096]}}).encode()
    raw += b" " * (-len(raw) % 8)
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes([seed % 256]) * 4096)
    return sum(p.stat().st_size for p in folder.iterdir())


def run_queued(reg: Registry) -> None:
    """Run every runnable job in-process, as a worker would (in a thread: no signal handlers installed here)."""
    t = threading.Thread(target=worker_loop, args=(reg,), kwargs={"once": True})
    t.start()
    t.join()


def enqueue(reg: Registry, job_type: str, params: dict) -> int:
    with reg.session() as s:
        job, _ = jobs.enqueue(s, job_type, params)
        s.flush()
        return job.id


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


def scrape(server) -> dict[tuple[str, frozenset], float]:
    """Every sample of /metrics (of a server, or a base URL): {(name, frozenset(labels)): value}."""
    code, _, body = get(getattr(server, "url", server) + "/metrics")
    assert code == 200, body
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def value(samples, name: str, default: float | None = None, **labels) -> float:
    key = (name, frozenset(labels.items()))
    return samples.get(key, default) if default is not None else samples[key]


@pytest.fixture
def reg(db_url) -> Registry:
    r = Registry()
    r.init()
    return r


@pytest.fixture
def server(reg):
    srv = serve(supervisor_of(reg), "127.0.0.1", 0)
    yield srv
    srv.close()


def test_metrics_report_jobs_durations_bytes_store_and_scrub(reg, server, tmp_path):
    size_a = write_model(tmp_path / "model-a", 1)
    size_b = write_model(tmp_path / "model-b", 2)
    began = time.time()
    enqueue(reg, "import", {"folder": str(tmp_path / "model-a"), "name": "model-a"})
    enqueue(reg, "import", {"folder": str(tmp_path / "model-b"), "name": "model-b"})
    run_queued(reg)
    enqueue(reg, "verify", {"artifact_ids": [1]})
    enqueue(reg, "verify", {"artifact_ids": [2], "quick": True})
    enqueue(reg, "verify", {"artifact_ids": [99]})  # no such artifact: fails at once, not retried
    enqueue(reg, "scrub", {})
    run_queued(reg)
    elapsed = time.time() - began
    queued = enqueue(reg, "verify", {"artifact_ids": [1]})  # left queued

    m = scrape(server)
    assert value(m, "registry_database_up") == 1
    assert value(m, "registry_jobs", type="import", state="succeeded") == 2
    assert value(m, "registry_jobs", type="verify", state="succeeded") == 2
    assert value(m, "registry_jobs", type="verify", state="failed") == 1
    assert value(m, "registry_jobs", type="verify", state="queued") == 1
    assert value(m, "registry_jobs", type="merge", state="running") == 0  # every type and state is there
    assert value(m, "registry_jobs_finished_total", type="verify", state="succeeded") == 2
    assert value(m, "registry_jobs_finished_total", type="verify", state="failed") == 1
    assert value(m, "registry_jobs_finished_total", type="scrub", state="succeeded") == 1
    assert value(m, "registry_job_duration_seconds_count", type="verify") == 3
    assert value(m, "registry_job_duration_seconds_bucket", type="verify", le="+Inf") == 3
    assert value(m, "registry_job_duration_seconds_bucket", type="import", le="21600.0") == 2
    assert 0 < value(m, "registry_job_duration_seconds_sum", type="import") < elapsed
    assert value(m, "registry_store_blobs") == 4  # two configs, two weights
    assert value(m, "registry_store_bytes") == size_a + size_b
    assert value(m, "registry_artifacts", kind="base", status="ready") == 2
    assert value(m, "registry_scrub_running") == 0
    with reg.read_session() as s:
        scrub_done = s.scalars(select(Job.finished_at).where(Job.type == "scrub")).one()
        queued_due = s.get(Job, queued).run_after
    assert value(m, "registry_scrub_last_success_timestamp_seconds") == pytest.approx(
        (scrub_done - datetime(1970, 1, 1)).total_seconds(), abs=0.01)
    assert 0 <= value(m, "registry_jobs_oldest_queued_seconds") < (datetime.utcnow() - queued_due).total_seconds() + 5
    assert value(m, "registry_corruptions_total", event="scrub_corrupt") == 0
    # Counters do not count a job twice when scraped again.
    again = scrape(server)
    assert value(again, "registry_jobs_finished_total", type="verify", state="succeeded") == 2
    assert value(again, "registry_job_duration_seconds_count", type="import") == 2


def test_bytes_of_succeeded_jobs_are_counted_by_type(reg, server, tmp_path):
    size = write_model(tmp_path / "model", 1)
    enqueue(reg, "import", {"folder": str(tmp_path / "model"), "name": "model"})
    enqueue(reg, "verify", {"artifact_ids": [1]})
    enqueue(reg, "verify", {"artifact_ids": [1], "quick": True})  # counts files, not bytes
    enqueue(reg, "scrub", {})
    run_queued(reg)
    m = scrape(server)
    assert value(m, "registry_job_bytes_total", type="verify") == size
    assert value(m, "registry_job_bytes_total", type="scrub") == size


def test_a_running_scrub_shows_its_progress_and_corruption_is_counted(reg, server, tmp_path):
    size = write_model(tmp_path / "model", 1)
    enqueue(reg, "import", {"folder": str(tmp_path / "model"), "name": "model"})
    run_queued(reg)
    enqueue(reg, "scrub", {"bandwidth": size / 3})  # about 3 s: long enough for a heartbeat to record progress
    worker = threading.Thread(target=run_queued, args=(reg,))
    worker.start()
    try:
        deadline = time.monotonic() + 20
        while True:
            m = scrape(server)
            if value(m, "registry_scrub_running") == 1 and value(m, "registry_scrub_progress_total", unit="B"):
                break
            assert time.monotonic() < deadline, "the running scrub never showed in /metrics"
            time.sleep(0.1)
        assert value(m, "registry_scrub_progress_total", unit="B") == size
        assert 0 <= value(m, "registry_scrub_progress_done", unit="B") <= size
        assert value(m, "registry_scrub_last_success_timestamp_seconds") == 0  # none finished yet
    finally:
        worker.join()
    assert value(scrape(server), "registry_scrub_running") == 0

    # Damage the weights in place (same size): the next scrub finds it, marks the artifact corrupt.
    with reg.read_session() as s:
        sha = s.scalars(select(Blob.sha256).where(Blob.size > 4096)).one()
    blob = reg.store.path(sha)
    os.chmod(blob, 0o644)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    enqueue(reg, "scrub", {})
    t = threading.Thread(target=worker_loop, args=(reg,), kwargs={"once": True, "types": ["scrub"]})
    t.start()
    t.join()
    m = scrape(server)
    assert value(m, "registry_corruptions_total", event="scrub_corrupt") == 1
    assert value(m, "registry_artifacts", kind="base", status="corrupt") == 1
    assert value(m, "registry_jobs", type="repair", state="queued") == 1  # the scrub queued the repair


def test_a_port_in_use_is_one_line_bad_input(reg, server):
    port = server.server_address[1]
    with pytest.raises(BadInput) as exc:
        serve(supervisor_of(reg), "127.0.0.1", port)
    assert f"127.0.0.1:{port}" in str(exc.value) and "--metrics" in str(exc.value)
    assert exc.value.exit_code == 2


def test_a_scrape_of_10000_jobs_is_cheap(reg, server):
    with reg.session() as s:
        now = datetime.utcnow()
        rows = [{"type": ("verify", "pull", "import", "merge")[i % 4],
                 "state": ("succeeded", "failed", "queued", "cancelled")[i % 4], "params": {}, "attempts": 1,
                 "max_attempts": 3, "run_after": now, "created_at": now, "cancel_requested": False,
                 "progress_done": 1000, "progress_unit": "B",
                 "started_at": now - timedelta(seconds=100),
                 "finished_at": now - timedelta(seconds=i % 100) if i % 4 != 2 else None}
                for i in range(10_000)]
        s.execute(insert(Job), rows)
    scrape(server)  # the first one counts the 7,500 finished jobs
    times = []
    for _ in range(20):
        began = time.perf_counter()
        m = scrape(server)
        times.append(time.perf_counter() - began)
    assert value(m, "registry_jobs", type="pull", state="failed") == 2500
    p95 = statistics.quantiles(times, n=20)[-1]
    print(f"scrape of 10,000 jobs: median {statistics.median(times) * 1000:.1f} ms, p95 {p95 * 1000:.1f} ms")
    assert p95 < 0.25, times


def test_healthz_503_and_status_while_the_daemon_is_not_running(server):
    code, ctype, body = get(server.url + "/healthz")
    assert (code, body) == (503, "the daemon is not running (phase: starting)\n")
    code, ctype, body = get(server.url + "/status")
    assert code == 200 and ctype == "application/json"
    assert json.loads(body)["phase"] == "starting" and json.loads(body)["pid"] == os.getpid()
    assert get(server.url + "/nope")[0] == 404
    m = scrape(server)
    assert value(m, "registry_daemon_start_time_seconds") == pytest.approx(time.time(), abs=60)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(what: str, check, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_a_running_daemon_reports_workers_restarts_watch_events_and_health(reg, db_url, tmp_path):
    """The whole daemon (`registry daemon --workers 2`): what an operator's Prometheus and health checks see."""
    drop = tmp_path / "drop"
    drop.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = tmp_path / "daemon.toml"
    config.write_text(f'[[watch]]\npath = "{drop}"\nquiet_seconds = 1\nrescan = "1s"\n'
                      "[scrub]\nenabled = false\n[prune]\nenabled = false\n")
    daemon = subprocess.Popen([REGISTRY_BIN, "daemon", "--config", str(config), "--workers", "2",
                               "--metrics", f"127.0.0.1:{port}", "--grace", "5"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for("/healthz ok", lambda: get(url + "/healthz")[::2] == (200, "ok\n") if _listening(port) else False)
        m = wait_for("2 workers", lambda: (lambda m: m if value(m, "registry_workers_alive", pool="all") == 2
                                           else None)(scrape(url)))
        assert value(m, "registry_pool_size", pool="all") == 2
        assert value(m, "registry_worker_restarts_total", pool="all") == 0

        # A model dropped into the watched folder: seen, queued, imported by a worker.
        write_model(tmp_path / "staging" / "dropped", 7)
        (tmp_path / "staging" / "dropped").rename(drop / "dropped")
        m = wait_for("the import", lambda: (lambda m: m if value(m, "registry_jobs", type="import",
                                                                 state="succeeded") == 1 else None)(scrape(url)))
        assert value(m, "registry_watch_events_total", watch=str(drop), event="folders_queued") == 1
        assert value(m, "registry_watch_events_total", watch=str(drop), event="events_seen") >= 1
        assert value(m, "registry_watch_paused", watch=str(drop)) == 0
        assert value(m, "registry_artifacts", kind="base", status="ready") == 1
        m = wait_for("the finished import counted", lambda: (lambda m: m if value(
            m, "registry_job_duration_seconds_count", 0, type="import") == 1 else None)(scrape(url)))
        assert value(m, "registry_service_failing", service=f"watch:{drop}") == 0

        # kill -9 of a worker: restarted, and counted.
        status = json.loads(get(url + "/status")[2])
        assert status["pid"] == daemon.pid
        os.kill(status["pools"]["all"]["workers"][0]["pid"], signal.SIGKILL)
        m = wait_for("the restart", lambda: (lambda m: m if value(m, "registry_worker_restarts_total", pool="all")
                                             == 1 and value(m, "registry_workers_alive", pool="all") == 2
                                             else None)(scrape(url)))

        # The catalog goes away under the daemon: /healthz says so in one line.
        if db_url.startswith("sqlite"):
            (reg.home / "registry.db").rename(reg.home / "registry.db.moved")
            expected = "cannot read the catalog database"
        else:
            dispose_all()
            _drop_pg_database(make_url(db_url).database)
            expected = "does not exist"
        code, _, body = wait_for("503", lambda: (lambda r: r if r[0] == 503 else None)(get(url + "/healthz")))
        assert expected in body and len(body.strip().splitlines()) == 1, body
    finally:
        daemon.terminate()
        try:
            out, _ = daemon.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            out, _ = daemon.communicate()
    assert "Traceback" not in out, out


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0
