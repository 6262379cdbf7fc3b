"""Handler for `quantize` jobs: GPTQ int-N variants, evaluated."""
from __future__ import annotations

from typing import Any

from registry.config import load_worker_config
from registry.core import Registry
from registry.quantize import QuantizeOptions, quantize

from .context import HandlerResult, JobReporter


def handle(reg: Registry, params: dict[str, Any], reporter: JobReporter, job_id: int) -> HandlerResult:
    """Run a quantize job."""
    opts = QuantizeOptions(**params["options"])
    if opts.calibration:  # a path on this host, from whoever queued the job
        load_worker_config(reg.home).check_path(opts.calibration, "calibration file")
    # Jobs carry the artifact id (a digest may match several artifacts); `source`: an older job's digest ref.
    result = quantize(reg, params.get("source_id") or params["source"], opts, params.get("name"), reporter, job_id)
    return HandlerResult(artifact_id=result.artifact_id, result=result.to_dict(),
                         message=f"quantized into {result.name} {result.digest[:19]}")
