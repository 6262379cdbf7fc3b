"""Handler for `prune` jobs: delete finished jobs and events older than `older_than` (registry/prune.py)."""
from __future__ import annotations

from typing import Any

from registry.core import Registry
from registry.errors import BadInput
from registry.prune import prune

from .context import HandlerResult, JobReporter


def handle(reg: Registry, params: dict[str, Any], reporter: JobReporter, job_id: int) -> HandlerResult:
    if "older_than" not in params:
        raise BadInput("a prune job needs older_than (seconds)")
    result = prune(reg, params["older_than"])
    message = (f"deleted {result.jobs_deleted} finished job(s) and {result.events_deleted} event(s) from "
               f"before {result.cutoff}")
    if result.jobs_kept_referenced:
        message += f"; kept {result.jobs_kept_referenced} still referenced"
    return HandlerResult(result=result.to_dict(), message=message)
