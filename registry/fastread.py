"""`list`, `show` and `verify --quick` straight from a SQLite catalog, with the standard library's sqlite3.

Why this module exists: importing SQLAlchemy (and, to migrate, Alembic) costs about 0.3 s on a 2-core machine,
more than these commands need in all (the goal is under 0.25 s each). When the catalog is a SQLite file that is
already at the newest schema (schema.SCHEMA_HEAD), these commands read it here. In every other case `attempt`
returns None and the command takes its usual ORM path, which migrates, checks and explains: PostgreSQL (it
keeps the ORM), a missing or older database, an empty catalog (it may be a lost one: fsck.refuse_lost_catalog),
any SQLite error (the ORM path turns it into its one-line message), a quick verify that would mark artifacts
corrupt or attach to a running identical job, and REGISTRY_FAST_READ=0.

The queries mirror catalog.resolve, summary and details, and verify's quick check and the job it records; a
quick verify writes its finished job and its events in one transaction, as the ORM path leaves them.
tests/test_startup.py checks that both paths print the same bytes, text and JSON.
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, TypeVar

from .config import Settings
from .schema import SCHEMA_HEAD, UNFINISHED_STATES, check_one_match, digest_prefix, stored_dedup_key
from .store import LocalStore, StatStamp

log = logging.getLogger("registry.fastread")
T = TypeVar("T")


class Fallback(Exception):
    """This command needs the ORM path after all (something to migrate, check or write that only it does)."""


def attempt(settings: Settings, read: Callable[["FastCatalog"], T]) -> T | None:
    """`read(catalog)`, or None when the fast path does not apply (the caller then takes the ORM path)."""
    path = _sqlite_file(settings.database_url)
    if path is None or os.environ.get("REGISTRY_FAST_READ", "1") == "0":
        return None
    store = LocalStore(settings.home)  # checks REGISTRY_FILE_MODE, as Registry() does for every command
    try:
        # A short wait for a lock: reads in WAL mode never wait, and a quick verify's write that meets a busy
        # catalog falls back to the ORM path, which waits the full REGISTRY_BUSY_TIMEOUT and says so.
        conn = sqlite3.connect(path, timeout=min(settings.busy_timeout_ms / 1000, 0.2), isolation_level=None)
    except sqlite3.Error as exc:
        log.debug("fast read: cannot open %s (%s); using the ORM", path, exc)
        return None
    try:
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA foreign_keys = ON")  # the connection settings of db._make_engine
        conn.execute("PRAGMA synchronous = NORMAL")
        return read(FastCatalog(conn, store))
    except (sqlite3.Error, Fallback) as exc:
        log.debug("fast read of %s not possible (%s); using the ORM", path, exc)
        if conn.in_transaction:
            conn.rollback()
        return None
    finally:
        conn.close()


def _sqlite_file(url: str) -> str | None:
    """The file of a plain `sqlite:///PATH` URL (what the default is); None for anything else."""
    if not url.startswith("sqlite:///") or "?" in url or "%" in url:
        return None
    path = url[len("sqlite:///"):]
    return path if path and path != ":memory:" and os.path.isfile(path) else None


@dataclass
class FinishedJob:
    """The fields of a finished job row that the `verify` command prints."""

    id: int
    state: str
    exit_code: int
    result: dict[str, Any]


class FastCatalog:
    """Read transactions on one sqlite3 connection; each first checks that the fast path applies."""

    def __init__(self, conn: sqlite3.Connection, store: LocalStore):
        self.conn, self.store = conn, store

    def _begin(self, immediate: bool = False) -> None:
        # A read takes no write lock (like the ORM's read sessions); a write takes it up front (BEGIN IMMEDIATE).
        self.conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
        if self.conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            raise Fallback("the catalog is not in WAL mode yet")
        try:
            version = self.conn.execute("SELECT version_num FROM alembic_version").fetchone()
        except sqlite3.OperationalError:
            raise Fallback("no schema yet") from None
        if version is None or version[0] != SCHEMA_HEAD:
            raise Fallback(f"schema {version and version[0]} is not {SCHEMA_HEAD}")
        if not self.conn.execute("SELECT 1 FROM artifacts").fetchone() and \
                not self.conn.execute("SELECT 1 FROM events").fetchone():
            raise Fallback("an empty catalog (the ORM path checks it is not a lost one)")

    def _one(self, sql: str, *args: Any) -> sqlite3.Row | None:
        return self.conn.execute(sql, args).fetchone()

    def _all(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        return self.conn.execute(sql, args).fetchall()

    # -- list and show ------------------------------------------------------------------------------------

    def summaries(self, kind: str | None, include_deleted: bool) -> list[dict[str, Any]]:
        """What `registry list` prints: catalog.summary of catalog.list_artifacts."""
        self._begin()
        where = [*(["kind = ?"] if kind else []), *([] if include_deleted else ["status != 'deleted'"])]
        rows = self._all("SELECT * FROM artifacts" + (" WHERE " + " AND ".join(where) if where else "")
                         + " ORDER BY created_at DESC, id DESC", *([kind] if kind else []))
        counts = dict(self._all("SELECT artifact_id, COUNT(*) FROM files GROUP BY artifact_id"))
        tags: dict[int, list[str]] = {}
        for artifact_id, name in self._all("SELECT artifact_id, name FROM tags ORDER BY name"):
            tags.setdefault(artifact_id, []).append(name)
        items = [self._summary(a, counts.get(a["id"], 0), tags.get(a["id"], [])) for a in rows]
        self.conn.commit()
        return items

    def details(self, ref: str) -> dict[str, Any]:
        """What `registry show REF` prints: catalog.details of catalog.resolve."""
        self._begin()
        a = self.resolve(ref)
        files = self._all("SELECT path, size, sha256 FROM files WHERE artifact_id = ? ORDER BY path", a["id"])
        tags = [r[0] for r in self._all("SELECT name FROM tags WHERE artifact_id = ? ORDER BY name", a["id"])]
        events = self._all("SELECT * FROM events WHERE artifact_id = ? ORDER BY id", a["id"])
        job_ids = sorted({e["job_id"] for e in events if e["job_id"] is not None})
        jobs = self._all("SELECT id, type, state, finished_at FROM jobs WHERE result_artifact_id = ?"
                         + (f" OR id IN ({','.join('?' * len(job_ids))})" if job_ids else "") + " ORDER BY id",
                         a["id"], *job_ids)

        def side(column: str, other: str) -> list[dict[str, Any]]:
            rows = self._all(f"SELECT e.role, a.name, a.digest, a.status FROM edges e JOIN artifacts a "
                             f"ON a.id = e.{other} WHERE e.{column} = ? ORDER BY a.id", a["id"])
            return [{"role": r["role"], "name": r["name"], "digest": r["digest"], "status": r["status"]} for r in rows]

        data = {
            **self._summary(a, len(files), tags),
            "metadata": _json(a["meta"]),
            "provenance": _json(a["provenance"]),
            "file_list": [{"path": f["path"], "size": f["size"], "sha256": f["sha256"]} for f in files],
            "lineage": {"parents": side("child_id", "parent_id"), "children": side("parent_id", "child_id")},
            "jobs": [{"id": j["id"], "type": j["type"], "state": j["state"],
                      "finished_at": j["finished_at"] and _iso(j["finished_at"])} for j in jobs],
            "events": [{"at": _iso(e["at"]), "kind": e["kind"], "job_id": e["job_id"], "actor": e["actor"],
                        "detail": _json(e["detail"])} for e in events],
        }
        self.conn.commit()
        return data

    @staticmethod
    def _summary(a: sqlite3.Row, files: int, tags: list[str]) -> dict[str, Any]:
        return {
            "id": a["id"], "name": a["name"], "kind": a["kind"], "status": a["status"], "digest": a["digest"],
            "size": a["total_size"], "files": files, "created_at": _iso(a["created_at"]), "tags": tags,
            "source": {"repo": a["source_repo"], "revision": a["source_revision"], "path": a["source_path"],
                       "endpoint": a["source_endpoint"], "ref": a["source_ref"]},
        }

    def resolve(self, ref: str) -> sqlite3.Row:
        """catalog.resolve: a live artifact by tag, name or `sha256:` digest prefix, with the same errors."""
        tag = self._one("SELECT artifact_id FROM tags WHERE name = ?", ref)
        if tag is not None:
            artifact = self._one("SELECT * FROM artifacts WHERE id = ?", tag[0])
            if artifact is None:
                raise Fallback(f"tag {ref} points at no artifact")
            return artifact
        by_name = self._one("SELECT * FROM artifacts WHERE name = ? AND status != 'deleted'", ref)
        if by_name is not None:
            return by_name
        found = self._all("SELECT * FROM artifacts WHERE digest LIKE ? || '%' AND status != 'deleted' ORDER BY name",
                          digest_prefix(ref))
        check_one_match(ref, [(a["name"], a["digest"]) for a in found])
        return found[0]

    # -- verify --quick -----------------------------------------------------------------------------------

    def verify_quick(self, refs: tuple[str, ...], all_artifacts: bool,
                     request: Callable[[list[int], bool, bool], tuple[dict, str]]) -> FinishedJob:
        """What `registry verify --quick` does in-process (the verify job of workers/verify.py and verify.py):
        compare stat stamps, then record a finished job and a verify event per artifact. `request(ids, all,
        quick)` gives the job's params and dedup key, as the CLI builds them for the ORM path."""
        self._begin()
        ids = sorted({self.resolve(r)["id"] for r in refs})
        params, dedup_key = request(ids, all_artifacts, True)
        if all_artifacts:
            artifacts = self._all("SELECT * FROM artifacts WHERE status != 'deleted' ORDER BY created_at DESC, id DESC")
        else:
            artifacts = [self._one("SELECT * FROM artifacts WHERE id = ? AND status != 'deleted'", i) for i in ids]
            if None in artifacts:
                raise Fallback("an artifact was removed meanwhile")  # the ORM path's job says so
        manifests = {a["id"]: self._all("SELECT path, sha256, size FROM files WHERE artifact_id = ? ORDER BY path",
                                        a["id"]) for a in artifacts}
        targets = {f["sha256"]: f["size"] for files in manifests.values() for f in files}
        stamps = {}
        for sha in targets:
            b = self._one("SELECT stat_size, stat_mtime_ns, stat_inode FROM blobs WHERE sha256 = ?", sha)
            if b is not None and b["stat_mtime_ns"] is not None:
                stamps[sha] = StatStamp(b["stat_size"], b["stat_mtime_ns"], b["stat_inode"])
        started = self._db_now()
        self.conn.commit()

        outcomes = {sha: self._quick_one(sha, size, stamps.get(sha)) for sha, size in targets.items()}
        if any(status in ("missing", "wrong_size") for status, _ in outcomes.values()):
            raise Fallback("damaged files: the ORM path marks the artifacts (and those sharing them) corrupt")
        reports = [self._report(a, manifests[a["id"]], outcomes) for a in artifacts]
        bad = [r["name"] for r in reports if not r["ok"]]
        result = json.dumps({"artifacts": reports})
        state, exit_code = ("failed", 1) if bad else ("succeeded", 0)
        error = f"verification failed for {', '.join(bad)}" if bad else None
        message = None if bad else f"{len(reports)} artifact(s) verified"

        self._begin(immediate=True)
        key = stored_dedup_key("verify", dedup_key)
        if self._one(f"SELECT id FROM jobs WHERE dedup_key = ? AND state IN ({','.join('?' * len(UNFINISHED_STATES))})",
                     key, *UNFINISHED_STATES):
            raise Fallback("an identical verify is running: the ORM path attaches to it")
        finished = self._db_now()
        # The row a claimed and completed (or failed, no retry) job leaves: workers/runner.py and jobs.py.
        job_id = self.conn.execute(
            "INSERT INTO jobs (type, params, state, dedup_key, attempts, max_attempts, run_after, heartbeat_at, "
            "cancel_requested, progress_done, message, error, exit_code, result, created_at, started_at, finished_at) "
            "VALUES ('verify', ?, ?, ?, 1, 3, ?, ?, 0, 0, ?, ?, ?, ?, ?, ?, ?)",
            (json.dumps(params), state, key, started, started, message, error, exit_code, result, started, started,
             finished)).lastrowid
        for a, report in zip(artifacts, reports):
            detail = {"quick": True, "problems": [{"path": f["path"], "status": f["status"]}
                                                  for f in report["files"] if f["status"] != "ok"]}
            self.conn.execute("INSERT INTO events (at, kind, artifact_id, job_id, detail) VALUES (?, ?, ?, ?, ?)",
                              (_stored(datetime.now(timezone.utc).replace(tzinfo=None)),
                               "verified_ok" if report["ok"] else "verify_failed", a["id"], job_id, json.dumps(detail)))
        self.conn.commit()
        return FinishedJob(job_id, state, exit_code, json.loads(result))

    def _quick_one(self, sha: str, size: int, stamp: StatStamp | None) -> tuple[str, int | None]:
        """verify._quick_one: (status, actual size)."""
        try:
            now = StatStamp.of(self.store.path(sha))
        except FileNotFoundError:
            return ("missing", None)
        if now.size != size:
            return ("wrong_size", now.size)
        if stamp is None or now != stamp:
            return ("changed", now.size)
        return ("ok", now.size)

    @staticmethod
    def _report(a: sqlite3.Row, files: list[sqlite3.Row], outcomes: dict[str, tuple]) -> dict[str, Any]:
        """verify._report of a quick check, as ArtifactCheck.to_dict (with its FileChecks) gives it."""
        checks = []
        for f in files:
            status, actual_size = outcomes[f["sha256"]]
            checks.append({"path": f["path"], "status": status, "expected": f["sha256"],
                           "actual": f["sha256"] if status == "ok" else None, "expected_size": f["size"],
                           "actual_size": actual_size})
        return {"name": a["name"], "digest": a["digest"], "ok": all(c["status"] == "ok" for c in checks),
                "quick": True, "bytes_read": 0, "files": checks, "also_corrupt": []}

    def _db_now(self) -> str:
        """db.db_now (the database's clock, which every host sharing the catalog agrees on), stored as the ORM does."""
        return _stored(datetime.fromisoformat(self._one("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')")[0]))


def _stored(t: datetime) -> str:
    """A DateTime as SQLAlchemy stores it in SQLite."""
    return t.strftime("%Y-%m-%d %H:%M:%S.%f")


def _iso(stored: str) -> str:
    """A stored DateTime as the ORM path prints it: isoformat (SQLAlchemy reads it with fromisoformat) + Z."""
    return datetime.fromisoformat(stored).isoformat() + "Z"


def _json(stored: str | None) -> Any:
    return None if stored is None else json.loads(stored)
