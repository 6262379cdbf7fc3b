"""Handler for `pull` jobs: download a hub commit into the store and register it."""
from __future__ import annotations

from typing import Any

from registry import hub
from registry.core import Registry
from registry.pull import pull

from .context import HandlerResult, JobReporter


def handle(reg: Registry, params: dict[str, Any], reporter: JobReporter, job_id: int) -> HandlerResult:
    """Run a pull job; the token is read here (token file, HF_TOKEN or login store), never from params."""
    token = hub.read_token(params.get("token_file"))
    result = pull(reg, params["repo_id"], params["revision"], params["commit"], params["endpoint"], token,
                  params.get("include"), params.get("exclude"), params.get("name"), params.get("kind"),
                  params.get("workers", 8), reporter, job_id)
    return HandlerResult(artifact_id=result.artifact_id, result=result.to_dict(),
                         message=f"pulled {result.repo_id}@{result.commit[:12]} as {result.name}")
