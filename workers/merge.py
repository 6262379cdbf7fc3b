"""Handler for `merge` jobs: fuse a LoRA adapter into its base."""
from __future__ import annotations

from typing import Any

from registry.core import Registry
from registry.merge import merge

from .context import HandlerResult, JobReporter


def handle(reg: Registry, params: dict[str, Any], reporter: JobReporter, job_id: int) -> HandlerResult:
    """Run a merge job."""
    # Jobs carry artifact ids (a digest may match several artifacts); `base`/`adapter`: an older job's digest refs.
    result = merge(reg, params.get("base_id") or params["base"], params.get("adapter_id") or params["adapter"],
                   params.get("name"), params.get("dtype", "auto"),
                   params.get("check", False), params.get("force", False), params.get("allow_pickle", False),
                   reporter, job_id)
    return HandlerResult(artifact_id=result.artifact_id, result=result.to_dict(),
                         message=f"merged into {result.name} {result.digest[:19]}")
