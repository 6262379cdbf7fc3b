"""Handler for `import` jobs: register a local folder or a Hugging Face cache snapshot."""
from __future__ import annotations

import json
from typing import Any

from registry.core import Registry
from registry.errors import BadInput
from registry.importer import check_import_extras, import_folder, import_hf_cache

from .context import HandlerResult, JobReporter


def handle(reg: Registry, params: dict[str, Any], reporter: JobReporter, job_id: int) -> HandlerResult:
    """Run an import job; `params` holds either `folder` or `hf_cache_repo`.

    A folder import may also carry `meta` (merged into the artifact's metadata), `tags` and `exclude` (globs),
    as the daemon's watch folders queue them; they are checked here, where the job enters the worker.
    """
    for key in ("name", "kind", "base", "folder"):
        if params.get(key) is not None and not isinstance(params[key], str):
            raise BadInput(f"import parameter {key} must be a string, got {json.dumps(params[key])[:60]}")
    if not isinstance(params.get("link", False), bool):
        raise BadInput(f"import parameter link must be true or false, got {json.dumps(params['link'])[:60]}")
    extras = dict(extra_meta=params.get("meta"), tags=params.get("tags"), exclude=params.get("exclude"))
    check_import_extras(**extras)
    common = dict(kind=params.get("kind"), base=params.get("base"), link=params.get("link", False),
                  reporter=reporter, job_id=job_id)
    if params.get("hf_cache_repo"):
        if any(v is not None for v in extras.values()):
            raise BadInput("import parameters meta, tags and exclude are for folder imports only")
        result = import_hf_cache(reg, params["hf_cache_repo"], params.get("name"), params.get("revision", "main"),
                                 params.get("cache_dir"), **common)
    else:
        if not params.get("folder") or not params.get("name"):
            raise BadInput("an import job needs params folder and name (or hf_cache_repo)")
        result = import_folder(reg, params["folder"], params["name"], **common, **extras)
    verb = "registered" if result.created else "already registered"
    return HandlerResult(artifact_id=result.artifact_id, result=result.to_dict(),
                         message=f"{verb} {result.name} {result.digest[:19]}")
