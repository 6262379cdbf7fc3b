"""Handler for `pull` jobs: download a hub commit into the store and register it."""
from __future__ import annotations

from typing import Any

from registry import hub
from registry.config import load_worker_config
from registry.core import Registry
from registry.pull import pull

from .context import HandlerResult, JobReporter


def handle(reg: Registry, params: dict[str, Any], reporter: JobReporter, job_id: int) -> HandlerResult:
    """Run a pull job. The endpoint must be trusted by this worker, and its token comes from the worker's
    configuration (or the CLI user who runs the job in-process), never from params: a `token_file` there,
    from a client before this rule, is ignored."""
    token = hub.token_for(load_worker_config(reg.home), params["endpoint"])
    result = pull(reg, params["repo_id"], params["revision"], params["commit"], params["endpoint"], token,
                  params.get("include"), params.get("exclude"), params.get("name"), params.get("kind"),
                  params.get("workers", 8), reporter, job_id, params.get("tags"))
    return HandlerResult(artifact_id=result.artifact_id, result=result.to_dict(),
                         message=f"pulled {result.repo_id}@{result.commit[:12]} as {result.name}")
