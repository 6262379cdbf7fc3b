"""Handler for `import` jobs: register a local folder or a Hugging Face cache snapshot."""
from __future__ import annotations

from typing import Any

from registry.core import Registry
from registry.importer import import_folder, import_hf_cache

from .context import HandlerResult, JobReporter


def handle(reg: Registry, params: dict[str, Any], reporter: JobReporter, job_id: int) -> HandlerResult:
    """Run an import job; `params` holds either `folder` or `hf_cache_repo`."""
    common = dict(kind=params.get("kind"), base=params.get("base"), link=params.get("link", False),
                  reporter=reporter, job_id=job_id)
    if params.get("hf_cache_repo"):
        result = import_hf_cache(reg, params["hf_cache_repo"], params.get("name"), params.get("revision", "main"),
                                 params.get("cache_dir"), **common)
    else:
        result = import_folder(reg, params["folder"], params["name"], **common)
    verb = "registered" if result.created else "already registered"
    return HandlerResult(artifact_id=result.artifact_id, result=result.to_dict(),
                         message=f"{verb} {result.name} {result.digest[:19]}")
