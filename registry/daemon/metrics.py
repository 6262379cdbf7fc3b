"""The daemon's HTTP endpoints: /metrics (Prometheus text format), /healthz and /status (the snapshot as JSON).

Everything is read at scrape time: the catalog database through the supervisor's Registry (a handful of
aggregate queries in one read-only transaction, which on SQLite takes no write lock) and
`supervisor.snapshot()` (pools, workers, services). Nothing is pushed to this module by the rest of the daemon.

Counters (finished jobs, their durations and bytes, corruptions found) are counted by this process from the
rows that appear after it started: each scrape reads the jobs that finished since the previous scrape (and
the events added since), so they only ever grow while the daemon runs and start from zero when it starts,
as Prometheus counters do. Summing the whole jobs table instead would make them drop whenever `prune`
deletes old jobs, which `rate()` reads as a reset and turns into a false spike. Gauges (jobs by state, store
size, the running scrub) are the catalog's current state. Several daemons sharing one PostgreSQL catalog all
report the same catalog-wide numbers (aggregate them with max, not sum); pools and services are per daemon.
"""
from __future__ import annotations

import json
import logging
import socket
import sqlite3
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.utils import floatToGoString
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url

from ..db import db_now, is_sqlite
from ..errors import BadInput, DatabaseUnavailable
from ..models import Artifact, Blob, Event, Job
from ..schema import JOB_STATES, JOB_TYPES

log = logging.getLogger("registry.daemon")

# Upper bounds (seconds) of the job duration histogram: a quick verify takes milliseconds, a pull or a
# quantization of a large model hours.
DURATION_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 1800, 3600, 7200, 21600)
# A job's finished_at is set inside the transaction that commits it; on PostgreSQL a transaction with an
# earlier finished_at may commit after one with a later one. Each scrape re-reads this much before the
# previous scrape (ids already counted are skipped), so such a job is still counted once.
LATE_COMMIT_SECONDS = 60.0
# The same for events, by id: a sequence value is taken at insert time, and the commit can come later.
LATE_EVENT_IDS = 1000
CORRUPTION_EVENTS = ("scrub_corrupt", "marked_corrupt")
HEALTH_DB_TIMEOUT_SECONDS = 5.0
# /healthz fails when the supervisor loop has not run (snapshot "loop_at") for this long.
LOOP_STALE_SECONDS = 30.0


def _unix(value: Any) -> float | None:
    """Unix seconds from a naive-UTC datetime (the catalog's clock), an ISO string, or a number."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value.timestamp()
    return None


class _Counts:
    """The counters this process has counted since it started (see the module's docstring)."""

    def __init__(self) -> None:
        self.started_at: datetime | None = None  # catalog time from which finished jobs count
        self.read_until: datetime | None = None  # catalog time of the previous scrape
        self.seen_jobs: dict[int, datetime] = {}  # counted job id -> when first seen, while it may be re-read
        self.event_floor: int | None = None  # events with a larger id count
        self.seen_events: set[int] = set()
        self.finished: dict[tuple[str, str], int] = {}
        self.buckets: dict[str, list[int]] = {}  # per type: count per bucket (not cumulative) + the +Inf one
        self.duration_sum: dict[str, float] = {}
        self.bytes: dict[str, int] = {}
        self.corruptions: dict[str, int] = {}

    def start(self, session) -> None:
        """Count from now on (called at serve time, or at the first scrape when the database was down)."""
        self.started_at = self.read_until = db_now(session)
        self.event_floor = session.execute(select(func.max(Event.id))).scalar() or 0

    def update(self, session, now: datetime) -> None:
        if self.started_at is None:
            self.start(session)
            return
        since = max(self.started_at, self.read_until - timedelta(seconds=LATE_COMMIT_SECONDS))
        # Ids first (cheap even for a burst of thousands of small jobs), then the rows of the new ones only.
        ids = session.execute(select(Job.id).where(Job.finished_at >= since)).scalars().all()
        new = [i for i in ids if i not in self.seen_jobs]
        for chunk in range(0, len(new), 500):
            rows = session.execute(
                select(Job.type, Job.state, Job.started_at, Job.finished_at, Job.progress_done, Job.progress_unit)
                .where(Job.id.in_(new[chunk:chunk + 500]))).all()
            for job_type, state, started, finished, done, unit in rows:
                self.finished[(job_type, state)] = self.finished.get((job_type, state), 0) + 1
                if started is not None and finished >= started:
                    self._observe(job_type, (finished - started).total_seconds())
                if state == "succeeded" and unit == "B" and done:
                    self.bytes[job_type] = self.bytes.get(job_type, 0) + int(done)
        self.seen_jobs.update((i, now) for i in new)
        self.read_until = now
        # finished_at is the catalog's clock at commit time, so a job seen at `now` finished by then: once that
        # is before the window the next scrape re-reads, its id is not needed any more.
        keep_from = now - timedelta(seconds=LATE_COMMIT_SECONDS)
        self.seen_jobs = {i: seen for i, seen in self.seen_jobs.items() if seen >= keep_from}

        events = session.execute(select(Event.id, Event.kind).where(Event.id > self.event_floor,
                                                                     Event.kind.in_(CORRUPTION_EVENTS))).all()
        for event_id, kind in events:
            if event_id not in self.seen_events:
                self.seen_events.add(event_id)
                self.corruptions[kind] = self.corruptions.get(kind, 0) + 1
        if self.seen_events:
            self.event_floor = max(self.event_floor, max(self.seen_events) - LATE_EVENT_IDS)
            self.seen_events = {i for i in self.seen_events if i > self.event_floor}

    def _observe(self, job_type: str, seconds: float) -> None:
        counts = self.buckets.setdefault(job_type, [0] * (len(DURATION_BUCKETS) + 1))
        slot = next((i for i, bound in enumerate(DURATION_BUCKETS) if seconds <= bound), len(DURATION_BUCKETS))
        counts[slot] += 1
        self.duration_sum[job_type] = self.duration_sum.get(job_type, 0.0) + seconds

    def families(self) -> Iterator[Metric]:
        finished = CounterMetricFamily("registry_jobs_finished", "Jobs that finished since the daemon started, "
                                       "by type and final state.", labels=["type", "state"])
        for (job_type, state), n in sorted(self.finished.items()):
            finished.add_metric([job_type, state], n)
        yield finished
        durations = HistogramMetricFamily("registry_job_duration_seconds", "Run time (started_at to "
                                          "finished_at of its last attempt) of jobs that finished since the "
                                          "daemon started, by type.", labels=["type"])
        for job_type, counts in sorted(self.buckets.items()):
            cumulative, running = [], 0
            for bound, n in zip([*map(floatToGoString, DURATION_BUCKETS), "+Inf"], counts):
                running += n
                cumulative.append((bound, running))
            durations.add_metric([job_type], cumulative, self.duration_sum[job_type])
        yield durations
        moved = CounterMetricFamily("registry_job_bytes", "Bytes processed by jobs that succeeded since the "
                                    "daemon started (their progress in bytes): pulled (pull), verified "
                                    "(verify, scrub), merged (merge), ...; by job type.", labels=["type"])
        for job_type, n in sorted(self.bytes.items()):
            moved.add_metric([job_type], n)
        yield moved
        corrupt = CounterMetricFamily("registry_corruptions", "Corruptions found since the daemon started: "
                                      "events scrub_corrupt (a blob the scrub found damaged) and "
                                      "marked_corrupt (an artifact marked corrupt because it shares a damaged "
                                      "blob); by event kind.", labels=["event"])
        for kind in CORRUPTION_EVENTS:
            corrupt.add_metric([kind], self.corruptions.get(kind, 0))
        yield corrupt


class RegistryCollector:
    """A prometheus_client collector reading the catalog and the supervisor's snapshot at each scrape."""

    def __init__(self, supervisor: Any):
        self.supervisor = supervisor
        self.counts = _Counts()
        self._lock = threading.Lock()  # one scrape at a time: the counters are updated by scrapes
        self.last_scrape_seconds = 0.0

    @property
    def reg(self):
        return getattr(self.supervisor, "reg", None)

    def start_counting(self) -> None:
        """Start the counters at the catalog's current time; when the database is down, the first scrape will."""
        try:
            with self.reg.read_session() as s:
                self.counts.start(s)
        except Exception as exc:  # noqa: BLE001 - the daemon starts anyway; /healthz says what is wrong
            log.warning("metrics: cannot read the catalog yet (%s); counting starts at the first scrape", exc)

    def describe(self) -> list:
        return []  # no query when the collector is registered

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            began = time.perf_counter()
            families = list(self._from_snapshot())
            try:
                families += self._from_database()
                up = 1
            except Exception as exc:  # noqa: BLE001 - the scrape still answers; registry_database_up says why not
                log.warning("metrics: cannot read the catalog: %s", exc)
                up = 0
            families += list(self.counts.families())
            db_up = GaugeMetricFamily("registry_database_up", "1 when the catalog database answered this "
                                      "scrape, else 0.")
            db_up.add_metric([], up)
            families.append(db_up)
            self.last_scrape_seconds = time.perf_counter() - began
            took = GaugeMetricFamily("registry_scrape_duration_seconds", "How long collecting these metrics took "
                                     "(the catalog queries and the snapshot).")
            took.add_metric([], self.last_scrape_seconds)
            families.append(took)
        yield from families

    def _from_database(self) -> list[Metric]:
        with self.reg.read_session() as s:
            now = db_now(s)
            by_state = {(t, st): n for t, st, n in s.execute(
                select(Job.type, Job.state, func.count()).group_by(Job.type, Job.state)).all()}
            oldest_queued = s.execute(select(func.min(Job.run_after)).where(Job.state == "queued")).scalar()
            artifacts = s.execute(select(Artifact.kind, Artifact.status, func.count())
                                  .group_by(Artifact.kind, Artifact.status)).all()
            blob_count, blob_bytes = s.execute(select(func.count(), func.coalesce(func.sum(Blob.size), 0))).one()
            scrub = s.execute(select(Job.progress_done, Job.progress_total, Job.progress_unit)
                              .where(Job.type == "scrub", Job.state == "running").order_by(Job.id).limit(1)).first()
            last_scrub = s.execute(select(func.max(Job.finished_at))
                                   .where(Job.type == "scrub", Job.state == "succeeded")).scalar()
            self.counts.update(s, now)

        jobs = GaugeMetricFamily("registry_jobs", "Jobs in the catalog by type and state (finished ones until "
                                 "prune removes them).", labels=["type", "state"])
        for job_type in sorted(set(JOB_TYPES) | {t for t, _ in by_state}):
            for state in JOB_STATES:
                jobs.add_metric([job_type, state], by_state.get((job_type, state), 0))
        wait = GaugeMetricFamily("registry_jobs_oldest_queued_seconds", "Age of the oldest queued job since it "
                                 "became due (0 when none is queued): how far behind the workers are.")
        wait.add_metric([], max(0.0, (now - oldest_queued).total_seconds()) if oldest_queued else 0.0)
        arts = GaugeMetricFamily("registry_artifacts", "Artifacts in the catalog by kind and status (ready, "
                                 "incomplete, corrupt, deleted).", labels=["kind", "status"])
        for kind, status, n in sorted(artifacts):
            arts.add_metric([kind, status], n)
        size = GaugeMetricFamily("registry_store_bytes", "Bytes of distinct content in the store (the blobs the "
                                 "catalog records).")
        size.add_metric([], int(blob_bytes))
        blobs = GaugeMetricFamily("registry_store_blobs", "Blobs (distinct files) in the store.")
        blobs.add_metric([], int(blob_count))
        running = GaugeMetricFamily("registry_scrub_running", "1 while a scrub job runs, else 0.")
        running.add_metric([], 1 if scrub else 0)
        unit = (scrub.progress_unit if scrub else None) or "B"
        done = GaugeMetricFamily("registry_scrub_progress_done", "Progress of the running scrub job, in its "
                                 "unit (0 when none runs).", labels=["unit"])
        done.add_metric([unit], scrub.progress_done or 0 if scrub else 0)
        total = GaugeMetricFamily("registry_scrub_progress_total", "Total work of the running scrub job, in "
                                  "its unit (0 when none runs or it has not said yet).", labels=["unit"])
        total.add_metric([unit], scrub.progress_total or 0 if scrub else 0)
        last = GaugeMetricFamily("registry_scrub_last_success_timestamp_seconds", "When the last successful "
                                 "scrub job finished, unix seconds (0: never).")
        last.add_metric([], _unix(last_scrub) or 0.0)
        return [jobs, wait, arts, size, blobs, running, done, total, last]

    def _from_snapshot(self) -> Iterator[Metric]:
        try:
            snap = self.supervisor.snapshot() or {}
        except Exception as exc:  # noqa: BLE001 - report what the database says even so
            log.warning("metrics: the supervisor's snapshot failed: %s", exc)
            return
        started = GaugeMetricFamily("registry_daemon_start_time_seconds", "When this daemon started, unix "
                                    "seconds.")
        started.add_metric([], _unix(snap.get("started_at")) or 0.0)
        yield started
        size = GaugeMetricFamily("registry_pool_size", "Configured worker processes per pool.", labels=["pool"])
        alive = GaugeMetricFamily("registry_workers_alive", "Worker processes alive per pool.", labels=["pool"])
        restarts = CounterMetricFamily("registry_worker_restarts", "Worker processes restarted after they died, "
                                       "per pool, since the daemon started.", labels=["pool"])
        for name, pool in sorted((snap.get("pools") or {}).items()):
            workers = pool.get("workers") or []
            size.add_metric([name], pool.get("size", len(workers)))
            alive.add_metric([name], sum(1 for w in workers if w.get("alive")))
            restarts.add_metric([name], sum(int(w.get("restarts") or 0) for w in workers))
        yield from (size, alive, restarts)
        ticks = CounterMetricFamily("registry_service_ticks", "Ticks (looks at the world) each daemon service "
                                    "made since the daemon started.", labels=["service"])
        last_tick = GaugeMetricFamily("registry_service_last_tick_timestamp_seconds", "When each service last "
                                      "ticked without error, unix seconds (0: not yet).", labels=["service"])
        failing = GaugeMetricFamily("registry_service_failing", "1 when the service's last tick failed (see "
                                    "`registry daemon status` for the error), else 0.", labels=["service"])
        watch_events = CounterMetricFamily("registry_watch_events", "What each watch folder saw and did since "
                                           "the daemon started, by watch path and event.", labels=["watch", "event"])
        watch_paused = GaugeMetricFamily("registry_watch_paused", "1 while a watch folder's imports are paused "
                                         "(disk full), else 0.", labels=["watch"])
        for status in snap.get("services") or []:
            if not isinstance(status, dict):
                continue
            name = str(status.get("name") or "?")
            ticks.add_metric([name], int(status.get("ticks") or 0))
            last_tick.add_metric([name], _unix(status.get("last_tick_at")) or 0.0)
            failing.add_metric([name], 1 if status.get("last_error") else 0)
            if name.startswith("watch:") or status.get("kind") == "watch":
                watch = str(status.get("path") or name.removeprefix("watch:"))
                counts = status.get("events") or status.get("counts") or {}
                if isinstance(counts, dict):
                    for event, n in sorted(counts.items()):
                        if isinstance(n, (int, float)) and not isinstance(n, bool):
                            watch_events.add_metric([watch, str(event)], n)
                elif isinstance(counts, (int, float)) and not isinstance(counts, bool):
                    watch_events.add_metric([watch, "all"], counts)
                watch_paused.add_metric([watch], 1 if status.get("paused") else 0)
        yield from (ticks, last_tick, failing, watch_events, watch_paused)


def _ask_sqlite_file(url: str) -> None:
    """Open the SQLite catalog afresh and read it. The daemon's pooled connections keep the file open and its
    pages cached, so they go on answering after the file was deleted, moved or damaged; a new connection (a
    restarted worker's) would not, and a deleted file would even be created again, empty."""
    path = make_url(url).database
    try:
        conn = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=HEALTH_DB_TIMEOUT_SECONDS)
        try:
            conn.execute("SELECT version_num FROM alembic_version").fetchone()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise DatabaseUnavailable(f"cannot read the catalog database {path}: {exc}") from None


class MetricsServer(ThreadingHTTPServer):
    """The HTTP server; `serve` starts it in a thread. `close()` stops it."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], supervisor: Any):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self.supervisor = supervisor
        self.collector = RegistryCollector(supervisor)
        self.prometheus = CollectorRegistry(auto_describe=False)
        self.prometheus.register(self.collector)
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def health_problem(self) -> str | None:
        """None when healthy, else the reason in one line: the supervisor loop or the database."""
        try:
            snap = self.supervisor.snapshot() or {}
        except Exception as exc:  # noqa: BLE001
            return f"the supervisor cannot report its state: {type(exc).__name__}: {exc}"
        alive = getattr(self.supervisor, "alive", None)
        if callable(alive) and not alive():
            return f"the daemon is not running (phase: {snap.get('phase') or 'unknown'})"
        loop_at = _unix(snap.get("loop_at"))
        if loop_at is not None and time.time() - loop_at > LOOP_STALE_SECONDS:
            return f"the supervisor loop has not run for {time.time() - loop_at:.0f} s"
        return self._database_problem()

    def _database_problem(self) -> str | None:
        reg = self.supervisor.reg
        outcome: dict[str, str | None] = {}

        def ask() -> None:
            try:
                if is_sqlite(reg.settings.database_url):
                    _ask_sqlite_file(reg.settings.database_url)
                else:
                    with reg.read_session() as s:
                        s.execute(text("SELECT version_num FROM alembic_version")).scalar()
                outcome["problem"] = None
            except Exception as exc:  # noqa: BLE001 - the registry's one-line error says what is wrong
                outcome["problem"] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__

        # In a thread: an unreachable PostgreSQL host would otherwise hold the answer for the connect timeout.
        asker = threading.Thread(target=ask, daemon=True, name="healthz-db")
        asker.start()
        asker.join(HEALTH_DB_TIMEOUT_SECONDS)
        if "problem" not in outcome:
            return f"the catalog database did not answer within {HEALTH_DB_TIMEOUT_SECONDS:g} s"
        return outcome["problem"]

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        if self.thread is not None:
            self.thread.join()


class _Handler(BaseHTTPRequestHandler):
    server: MetricsServer
    server_version = "registry-daemon"

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = self.path.split("?", 1)[0]
        try:
            if path == "/metrics":
                # The text format, or OpenMetrics when the scraper asks for it.
                encode, content_type = choose_encoder(self.headers.get("Accept"))
                self._send(200, encode(self.server.prometheus), content_type)
            elif path == "/healthz":
                problem = self.server.health_problem()
                self._send(503 if problem else 200, (f"{problem}\n" if problem else "ok\n").encode())
            elif path == "/status":
                body = json.dumps(self.server.supervisor.snapshot(), indent=2, default=str) + "\n"
                self._send(200, body.encode(), "application/json")
            else:
                self._send(404, b"not found; try /metrics, /healthz or /status\n")
        except Exception as exc:  # noqa: BLE001 - answer the client, keep the server up
            log.warning("metrics: %s failed: %s", path, exc, exc_info=log.isEnabledFor(logging.DEBUG))
            self._send(500, f"{type(exc).__name__}: {exc}\n".encode())

    def _send(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        log.debug("metrics: %s %s", self.address_string(), format % args)


def serve(supervisor: Any, host: str = "127.0.0.1", port: int = 9464) -> MetricsServer:
    """Start serving /metrics, /healthz and /status for `supervisor` (needs `.reg` and `.snapshot()`) in a
    thread; returns the server (`.url`, `.close()`). Port 0 picks a free port."""
    try:
        server = MetricsServer((host, port), supervisor)
    except OSError as exc:
        raise BadInput(f"metrics: cannot listen on {host}:{port}: {exc.strerror or exc}; give a free HOST:PORT "
                       "with --metrics or `metrics` in daemon.toml") from None
    server.collector.start_counting()
    server.thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5},
                                     daemon=True, name="metrics-http")
    server.thread.start()
    log.info("metrics on %s/metrics", server.url)
    return server
