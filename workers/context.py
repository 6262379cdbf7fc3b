"""What a handler gets besides its parameters: progress reporting that doubles as heartbeat and cancel check."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from registry.errors import JobCancelled, LeaseLost
from registry.progress import NullReporter, Reporter


@dataclass
class HandlerResult:
    """A handler's outcome: the artifact it produced, a JSON result, a message, and an exit code."""

    artifact_id: int | None = None
    result: dict[str, Any] = field(default_factory=dict)
    message: str | None = None
    error: str | None = None  # set (with exit_code 1) when the job ran but its answer is a failure
    exit_code: int = 0


class JobReporter(NullReporter):
    """Counts progress for the heartbeat thread, forwards it to a terminal reporter, and stops on cancel."""

    def __init__(self, job_id: int, inner: Reporter | None = None):
        super().__init__()
        self.job_id = job_id
        self.inner = inner or NullReporter()
        self.stop_reason: Exception | None = None
        self.stopped = threading.Event()

    def start(self, total: int | None, unit: str = "B", description: str = "") -> None:
        super().start(total, unit, description)
        self.inner.start(total, unit, description)

    def advance(self, amount: int) -> None:
        if self.stopped.is_set():
            raise self.stop_reason or JobCancelled(f"job {self.job_id} was cancelled")
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

    def stop(self, reason: JobCancelled | LeaseLost) -> None:
        """Make the handler's next progress call raise `reason`."""
        self.stop_reason = reason
        self.stopped.set()
