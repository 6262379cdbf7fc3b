"""Handler for `scrub` jobs: re-verify every blob at rest within a bandwidth budget (registry/scrub.py)."""
from __future__ import annotations

import math
from typing import Any

from registry.core import Registry
from registry.errors import BadInput
from registry.render import human_size
from registry.scrub import scrub

from .context import HandlerResult, JobReporter


def handle(reg: Registry, params: dict[str, Any], reporter: JobReporter, job_id: int) -> HandlerResult:
    """Scrub the store. Damage found is not this job's failure: the artifacts are marked corrupt, events
    recorded and repair jobs queued, and the job succeeds with what it found in its result."""
    bandwidth = params.get("bandwidth")
    if bandwidth is not None and (isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float))
                                  or not math.isfinite(bandwidth) or bandwidth <= 0):
        raise BadInput(f"scrub bandwidth {bandwidth!r} must be a positive number of bytes per second, or absent")
    result = scrub(reg, bandwidth, reporter, job_id)
    found = (f"; {len(result.corrupt)} damaged blob(s), {len(result.repairs_queued)} repair job(s) queued"
             if result.corrupt else "; all intact")
    message = (f"scrubbed {result.blobs_checked} blob(s), {human_size(result.bytes_read)} in "
               f"{result.seconds:.1f}s{found}")
    return HandlerResult(result=result.to_dict(), message=message)
