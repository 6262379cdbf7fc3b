"""Handler for `quantize` jobs: GPTQ int-N variants, evaluated."""
from __future__ import annotations

from typing import Any

from registry.config import load_worker_config
from registry.core import Registry
from registry.quantize import QuantizeOptions, quantize

from .context import HandlerResult, JobReporter, options_from_params
from .merge import check_result_tags, tag_result


def handle(reg: Registry, params: dict[str, Any], reporter: JobReporter, job_id: int) -> HandlerResult:
    """Run a quantize job."""
    opts = options_from_params(QuantizeOptions, params.get("options"), "quantize")
    tags = check_result_tags(reg, params.get("tags"))
    if opts.calibration:  # a path on this host, from whoever queued the job
        load_worker_config(reg.home).check_path(opts.calibration, "calibration file")
    # Jobs carry the artifact id (a digest may match several artifacts); `source`: an older job's digest ref.
    result = quantize(reg, params.get("source_id") or params["source"], opts, params.get("name"), reporter, job_id)
    tag_result(reg, result.artifact_id, tags, job_id)
    outcome = {**result.to_dict(), **({"tags": tags} if tags else {})}  # tags: a pipeline's job
    return HandlerResult(artifact_id=result.artifact_id, result=outcome,
                         message=f"quantized into {result.name} {result.digest[:19]}")

