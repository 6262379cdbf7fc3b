"""The shape every daemon service has: a `tick` that looks at the world and queues jobs, run on an interval
in a thread of its own by the supervisor, woken early by `wake()` (a file system event, a reload)."""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

log = logging.getLogger("registry.daemon")


class Service:
    """Subclasses set `name` and `interval` and implement `tick`; `status` feeds `daemon status` and metrics.

    A tick must be quick and must not run jobs: it queues them. An exception in a tick is logged and the
    service goes on at its next interval (a database restart must not kill the daemon).
    """

    name = "service"
    interval: float = 60.0

    def __init__(self) -> None:
        self._wake = threading.Event()
        self.last_tick_at: float | None = None  # time.time() of the last tick that ended without error
        self.last_error: str | None = None
        self.ticks = 0

    def start(self) -> None:
        """Called once before the first tick (start a watchdog observer, ...)."""

    def stop(self) -> None:
        """Called once when the daemon stops."""

    def tick(self) -> None:
        raise NotImplementedError

    def wake(self) -> None:
        """Run the next tick now instead of at the end of the interval."""
        self._wake.set()

    def status(self) -> dict[str, Any]:
        """What `registry daemon status` prints and /metrics exports for this service."""
        return {"name": self.name, "interval": self.interval, "last_tick_at": self.last_tick_at,
                "last_error": self.last_error, "ticks": self.ticks}

    def run(self, stopping: threading.Event) -> None:
        """The service's thread: tick, wait for the interval, a wake-up or the daemon stopping; repeat."""
        self.start()
        try:
            while not stopping.is_set():
                try:
                    self.tick()
                except Exception as exc:  # noqa: BLE001 - keep the daemon up; say what went wrong
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    log.warning("%s: %s", self.name, self.last_error, exc_info=log.isEnabledFor(logging.DEBUG))
                else:
                    self.last_tick_at, self.last_error = time.time(), None
                self.ticks += 1
                deadline = time.monotonic() + self.interval
                while not stopping.is_set() and not self._wake.is_set():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._wake.wait(min(left, 0.5))  # 0.5 s: notice `stopping`, which has no wake-up of its own
                self._wake.clear()
        finally:
            self.stop()
