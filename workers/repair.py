"""Handler for `repair` jobs: restore an artifact's missing or damaged blobs from its source."""
from __future__ import annotations

from typing import Any

from registry.core import Registry
from registry.repair import repair

from .context import HandlerResult, JobReporter


def handle(reg: Registry, params: dict[str, Any], reporter: JobReporter, job_id: int) -> HandlerResult:
    """Run a repair job; files that cannot be restored make the job's answer a failure with exit code 1."""
    result = repair(reg, params["artifact_id"], reporter, job_id, from_dir=params.get("from_dir"))
    if not result.ok:
        paths = ", ".join(u["path"] for u in result.unrestorable)
        return HandlerResult(artifact_id=result.artifact_id, result=result.to_dict(), exit_code=1,
                             error=f"{result.name}: cannot restore {paths}; {result.hint}")
    what = f"restored {len(result.restored)} file(s)" if result.damaged else "nothing to repair"
    return HandlerResult(artifact_id=result.artifact_id, result=result.to_dict(), message=f"{result.name}: {what}")
