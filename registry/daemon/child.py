"""How the daemon starts a worker: `python -m registry.daemon.child PARENT_PID worker ARGS...`.

This process becomes the worker itself (the pid the daemon knows is the pid in the worker's lease owner, so
`jobs.expire_leases_of_process` finds its jobs when it dies). Before running `registry worker` it:
- asks Linux to send it SIGTERM when the daemon dies (PR_SET_PDEATHSIG), so a daemon killed with -9 leaves no
  worker behind for ever: each drains as on `systemctl stop` (finishes its job within --grace, else re-queues
  it) and exits. Elsewhere a thread watches the parent pid instead;
- writes its log records as JSON lines on its output, which the daemon re-emits in its own format (logs.py).
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """SIGTERM to this process when `parent` exits (at once, or within a second where prctl is missing)."""
    armed = False
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent:  # the daemon died before prctl took effect: nothing to work for
        sys.exit(0)
    if not armed:
        def watch() -> None:
            while os.getppid() == parent:
                threading.Event().wait(1.0)
            os.kill(os.getpid(), signal.SIGTERM)
        threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def log_to_daemon() -> None:
    from .logs import WireFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(WireFormatter())
    root = logging.getLogger()
    root.addHandler(handler)  # before `registry worker` configures logging: its basicConfig then adds nothing
    debug = os.environ.get("REGISTRY_DEBUG", "") not in ("", "0")
    root.setLevel(logging.DEBUG if debug else logging.WARNING)
    logging.getLogger("registry").setLevel(logging.DEBUG if debug else logging.INFO)


def main() -> None:
    parent, args = int(sys.argv[1]), sys.argv[2:]
    die_with_parent(parent)
    log_to_daemon()
    from registry.cli import main as registry_main

    sys.argv = ["registry", *args]
    registry_main()


if __name__ == "__main__":
    main()
