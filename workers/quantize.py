"""Handler for `quantize` jobs: GPTQ int-N variants, evaluated."""
from __future__ import annotations

from typing import Any

from registry.core import Registry
from registry.quantize import QuantizeOptions, quantize

from .context import HandlerResult, JobReporter


def handle(reg: Registry, params: dict[str, Any], reporter: JobReporter, job_id: int) -> HandlerResult:
    """Run a quantize job."""
    opts = QuantizeOptions(**params["options"])
    result = quantize(reg, params["source"], opts, params.get("name"), reporter, job_id)
    return HandlerResult(artifact_id=result.artifact_id, result=result.to_dict(),
                         message=f"quantized into {result.name} {result.digest[:19]}")
