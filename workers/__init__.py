"""Job handlers (one module per job type) and the worker loop that runs them."""
from .runner import HANDLERS, run_job, run_or_attach, worker_loop

__all__ = ["HANDLERS", "run_job", "run_or_attach", "worker_loop"]
