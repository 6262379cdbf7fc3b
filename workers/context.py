"""What a handler gets besides its parameters: progress reporting that doubles as heartbeat and cancel check."""
from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from typing import Any, TypeVar

from registry.errors import BadInput, JobCancelled, LeaseLost
from registry.progress import NullReporter, Reporter


Options = TypeVar("Options")


def options_from_params(cls: type[Options], options: Any, what: str) -> Options:
    """A job's `options` table as the options dataclass `cls`; unknown keys are bad input (a typo, or a newer
    client). `what` names the job type in the message."""
    if not isinstance(options, dict):
        raise BadInput(f"job parameter options must be a table of {what} options, got {options!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise BadInput(f"unknown {what} option(s) {', '.join(unknown)} in the job; known: {', '.join(sorted(known))}")
    return cls(**options)


@dataclass
class HandlerResult:
    """A handler's outcome: the artifact it produced, a JSON result, a message, and an exit code."""

    artifact_id: int | None = None
    result: dict[str, Any] = field(default_factory=dict)
    message: str | None = None
    error: str | None = None  # set (with exit_code 1) when the job ran but its answer is a failure
    exit_code: int = 0


class JobReporter(NullReporter):
    """Counts progress for the heartbeat thread, forwards it to a terminal reporter, and stops on cancel.

    Every progress call (and `check`, which long steps without progress call, e.g. GPTQ's forward hooks)
    raises once the job must stop: cancelled, its worker stopping, or its lease no longer safely held.
    """

    def __init__(self, job_id: int, inner: Reporter | None = None):
        super().__init__()
        self.job_id = job_id
        self.inner = inner or NullReporter()
        self.stop_reason: BaseException | None = None
        self.stopped = threading.Event()
        # Monotonic time until which our lease is surely held; the heartbeat moves it on each renewal.
        self.lease_safe_until = float("inf")

    def check(self) -> None:
        """Raise the reason to stop, if there is one; cheap enough to call thousands of times a second."""
        if self.stopped.is_set():
            raise self.stop_reason or JobCancelled(f"job {self.job_id} was cancelled")
        if time.monotonic() > self.lease_safe_until:  # the heartbeat is stuck (e.g. on an unreachable database)
            self.stop(LeaseLost(f"could not renew the lease on job {self.job_id} in time; stopping this attempt"))
            raise self.stop_reason

    def start(self, total: int | None, unit: str = "B", description: str = "") -> None:
        super().start(total, unit, description)
        self.inner.start(total, unit, description)

    def advance(self, amount: int) -> None:
        self.check()
        super().advance(amount)
        self.inner.advance(amount)

    def finish(self) -> None:
        self.inner.finish()

    def file_started(self, name: str, total: int) -> object:
        return self.inner.file_started(name, total)

    def file_advance(self, handle: object, amount: int) -> None:
        self.inner.file_advance(handle, amount)

    def file_finished(self, handle: object) -> None:
        self.inner.file_finished(handle)

    def stop(self, reason: BaseException) -> None:
        """Make the handler's next progress call raise `reason` (JobCancelled, LeaseLost or WorkerStopped)."""
        if not self.stopped.is_set():
            self.stop_reason = reason
            self.stopped.set()
