"""Handler for `verify` jobs: re-hash artifacts against their manifests."""
from __future__ import annotations

from typing import Any

from registry.core import Registry
from registry.verify import verify

from .context import HandlerResult, JobReporter


def handle(reg: Registry, params: dict[str, Any], reporter: JobReporter, job_id: int) -> HandlerResult:
    """Run a verify job; a mismatch makes the job's answer a failure with exit code 1."""
    # Jobs carry artifact ids (a digest may match several artifacts); `refs`: an older job's digest refs.
    reports = verify(reg, params.get("artifact_ids") or params.get("refs"), params.get("all", False),
                     params.get("quick", False), reporter, job_id)
    bad = [r for r in reports if not r.ok]
    result = {"artifacts": [r.to_dict() for r in reports]}
    if bad:
        names = ", ".join(r.name for r in bad)
        return HandlerResult(result=result, error=f"verification failed for {names}", exit_code=1)
    return HandlerResult(result=result, message=f"{len(reports)} artifact(s) verified")
