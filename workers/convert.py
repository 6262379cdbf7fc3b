"""Handler for `convert` jobs: GGUF variants made with llama.cpp's converter, evaluated."""
from __future__ import annotations

from typing import Any

from registry.core import Registry
from registry.errors import BadInput
from registry.gguf.convert import convert
from registry.gguf.options import ConvertOptions

from .context import HandlerResult, JobReporter, options_from_params


def handle(reg: Registry, params: dict[str, Any], reporter: JobReporter, job_id: int) -> HandlerResult:
    """Run a convert job."""
    if params.get("to", "gguf") != "gguf":
        raise BadInput(f"job parameter to={params.get('to')!r}: only gguf conversions exist")
    opts = options_from_params(ConvertOptions, params.get("options"), "convert")
    result = convert(reg, params["source_id"], opts, params.get("name"), reporter, job_id)
    return HandlerResult(artifact_id=result.artifact_id, result=result.to_dict(),
                         message=f"converted into {result.name} {result.digest[:19]}")

