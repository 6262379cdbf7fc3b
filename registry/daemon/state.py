"""The daemon's state files and what `registry daemon status` shows from them.

Each daemon writes its snapshot to `<home>/daemon/state-<hostname>-<pid>.json` every `state_interval` seconds
and at once on a change (a worker started or died, a reload). One file per daemon: on a PostgreSQL catalog any
number of daemons may share a home (a shared file system), each on its own host. A daemon on this host counts
as running while its pid lives; one on another host while its file is fresh. Running jobs and their progress
come from the catalog, matched to the workers by the pid in the job's lease owner.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

# A daemon on another host counts as running while its state file is younger than this many state intervals.
STALE_INTERVALS = 3


def state_dir(home: Path) -> Path:
    return home / "daemon"


def state_path(home: Path, pid: int | None = None) -> Path:
    return state_dir(home) / f"state-{socket.gethostname()}-{pid or os.getpid()}.json"


def write(path: Path, snapshot: dict[str, Any]) -> None:
    """Atomically: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({**snapshot, "updated_at": time.time()}, default=str))
    os.replace(tmp, path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_all(home: Path, this_host: str) -> list[dict[str, Any]]:
    """Every daemon's last snapshot with `running` (and `stale_file`) set, running ones first."""
    found = []
    for path in sorted(state_dir(home).glob("state-*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # removed or replaced while we read it
        if not isinstance(data, dict) or not isinstance(data.get("pid"), int):
            continue
        data["state_file"] = str(path)
        if data.get("host") == this_host:
            data["running"] = _pid_alive(data["pid"])
        else:
            age = time.time() - float(data.get("updated_at") or 0)
            data["running"] = age < STALE_INTERVALS * float(data.get("state_interval") or 5)
        found.append(data)
    return sorted(found, key=lambda d: (not d["running"], d.get("hostname", ""), d["pid"]))


def remove_dead_files(home: Path, this_host: str) -> None:
    """A daemon killed with -9 leaves its file; the next daemon on the host clears it."""
    for data in read_all(home, this_host):
        if data.get("host") == this_host and not data["running"]:
            Path(data["state_file"]).unlink(missing_ok=True)


def attach_jobs(reg, daemons: list[dict[str, Any]]) -> None:
    """Add to each worker of each daemon the job it runs now (id, type, attempts, progress) from the catalog."""
    from sqlalchemy import select

    from ..models import Job

    with reg.read_session() as s:
        running = s.execute(select(Job.id, Job.type, Job.lease_owner, Job.attempts, Job.progress_done,
                                   Job.progress_total, Job.progress_unit, Job.started_at, Job.message)
                            .where(Job.state == "running")).all()
    by_owner: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in running:
        if (row.lease_owner or "").count(":") < 2:
            continue
        host, pid, _ = row.lease_owner.rsplit(":", 2)  # host:pid:random, as jobs.worker_id() makes it
        if pid.isdigit():
            by_owner.setdefault((host, int(pid)), []).append({
                "id": row.id, "type": row.type, "attempts": row.attempts, "progress_done": row.progress_done,
                "progress_total": row.progress_total, "progress_unit": row.progress_unit,
                "started_at": row.started_at.isoformat() if row.started_at else None, "message": row.message})
    for daemon in daemons:
        for pool in (daemon.get("pools") or {}).values():
            for worker in pool.get("workers") or []:
                worker["jobs"] = by_owner.get((daemon.get("host"), worker.get("pid")), []) if worker.get("alive") else []
