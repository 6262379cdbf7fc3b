"""Handler for `merge` jobs: fuse a LoRA adapter into its base."""
from __future__ import annotations

from typing import Any

from registry import jobs
from registry.catalog import check_name, check_tag, load, tag_artifact
from registry.core import Registry
from registry.errors import BadInput
from registry.merge import merge

from .context import HandlerResult, JobReporter


def handle(reg: Registry, params: dict[str, Any], reporter: JobReporter, job_id: int) -> HandlerResult:
    """Run a merge job."""
    tags = check_result_tags(reg, params.get("tags"))
    # Jobs carry artifact ids (a digest may match several artifacts); `base`/`adapter`: an older job's digest refs.
    result = merge(reg, params.get("base_id") or params["base"], params.get("adapter_id") or params["adapter"],
                   params.get("name"), params.get("dtype", "auto"),
                   params.get("check", False), params.get("force", False), params.get("allow_pickle", False),
                   reporter, job_id)
    tag_result(reg, result.artifact_id, tags, job_id)
    outcome = {**result.to_dict(), **({"tags": tags} if tags else {})}  # tags: a pipeline's job
    return HandlerResult(artifact_id=result.artifact_id, result=outcome,
                         message=f"merged into {result.name} {result.digest[:19]}")


def check_result_tags(reg: Registry, tags: Any) -> list[str]:
    """A job's `tags` param (a pipeline's, for its result), refused before any work when malformed or when a
    tag is a live artifact's name."""
    if tags is None:
        return []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise BadInput(f"job parameter tags must be a list of tag names, got {tags!r}")
    with reg.read_session() as s:
        for tag in tags:
            check_name(tag, "tag")
            check_tag(s, tag)
    return tags


def tag_result(reg: Registry, artifact_id: int, tags: list[str], job_id: int) -> None:
    """Point `tags` at the job's result, if this worker still holds the job (the fencing check)."""
    if not tags:
        return
    with reg.session() as s:
        jobs.check_fence(s, job_id)
        artifact = load(s, artifact_id)
        for tag in tags:
            tag_artifact(s, artifact, tag)
