"""Handler for `gc` jobs: the daemon's scheduled garbage collection (registry/gc.py)."""
from __future__ import annotations

from typing import Any

from registry.core import Registry
from registry.gc import collect_garbage
from registry.render import human_size

from .context import HandlerResult, JobReporter

LISTED = 100  # names kept in the job's result; the counts are always complete


def handle(reg: Registry, params: dict[str, Any], reporter: JobReporter, job_id: int) -> HandlerResult:
    report = collect_garbage(reg, dry_run=bool(params.get("dry_run", False)))
    result = report.to_dict()
    for key in ("blobs", "temp_files", "snapshots", "partials_kept"):
        result[f"{key}_count"] = len(result[key])
        result[key] = result[key][:LISTED]
    message = (f"freed {human_size(report.bytes_freed)}: {len(report.blobs)} blobs, "
               f"{len(report.temp_files)} temporary files, {len(report.snapshots)} snapshots")
    return HandlerResult(result=result, message=message)
