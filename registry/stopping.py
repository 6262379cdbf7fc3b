"""Stopping a long model computation (GPTQ) at the next layer when its job must stop (cancel, lost lease)."""
from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def stop_forward_when_stopped(model, reporter) -> Iterator[None]:
    """While inside, every module's forward first calls `reporter.check()`, which raises once the job must stop.

    GPTQ runs forward passes layer by layer for minutes without reporting progress; a pre-hook on each module
    fires many times per layer, so `registry cancel` (or a lost lease) takes effect within about a layer.
    Reporters without `check` (a plain library call) install nothing.
    """
    check = getattr(reporter, "check", None)
    if check is None:
        yield
        return

    def _hook(_module, _args):
        check()

    handles = [module.register_forward_pre_hook(_hook) for module in model.modules()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
