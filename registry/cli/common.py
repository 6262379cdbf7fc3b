"""Helpers shared by the command modules: the registry of the current command, running jobs, common options."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Callable

import click

from .. import render
from ..errors import error_for
from ..progress import terminal_reporter

if TYPE_CHECKING:
    from ..config import Settings
    from ..core import Registry

json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
detach_option = click.option("--detach", is_flag=True, help="Queue the job for a worker and return at once.")


class _LazyModule:
    """A library module imported on first use. Registering the commands (all that `registry --help` does) must
    not import SQLAlchemy (about 0.3 s of start-up), which catalog and jobs import."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)


catalog = _LazyModule("registry.catalog")
jobs = _LazyModule("registry.jobs")


class RegistryHolder:
    """The `cli` group's ctx.obj: the Registry, made on first use (it imports the ORM); its settings at once."""

    def __init__(self, home: str | None, database_url: str | None):
        self.home, self.database_url = home, database_url
        self._registry: Registry | None = None

    @property
    def settings(self) -> Settings:
        from ..config import load_settings

        return self._registry.settings if self._registry else load_settings(self.home, self.database_url)

    def get(self) -> Registry:
        if self._registry is None:
            from ..core import Registry

            self._registry = Registry(self.home, self.database_url)
        return self._registry


def _reg() -> Registry:
    return click.get_current_context().find_object(RegistryHolder).get()


def _fast_read(read: Callable[[Any], Any]) -> Any:
    """`read(catalog)` on a SQLite catalog read with the stdlib (fastread.py), or None: the caller then takes the
    ORM path, which migrates, checks and explains errors as always."""
    from ..fastread import attempt

    return attempt(click.get_current_context().find_object(RegistryHolder).settings, read)


def _run(job_type: str, params: dict, dedup_key: str, detach: bool, as_json: bool):
    """Run a job here (or attach to the identical one) and raise its error if it failed."""
    from ..workers import run_or_attach

    reporter = None if as_json else terminal_reporter()
    job = run_or_attach(_reg(), job_type, params, dedup_key, reporter, detach)
    if detach:
        data = {"job": job.id, "state": job.state}
        render.emit_json(data) if as_json else click.echo(f"queued job {job.id}; watch it with: registry job {job.id}")
        return None
    if job.state != "succeeded" and not (job.result and job.exit_code == 1):
        raise error_for(job.exit_code, job.error or job.message or f"job {job.id} {job.state}")
    return job


def _result(job, as_json: bool) -> dict | None:
    """Print a finished job's warnings, and its JSON when asked; returns the result for text output."""
    if job is None:
        return None
    for warning in job.result.get("warnings", []):
        click.echo(f"warning: {warning}", err=True)
    if as_json:
        render.emit_json({"job": job.id, **job.result})
        return None
    return job.result


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _worker_config():
    from ..config import load_worker_config

    return load_worker_config(_reg().home)


def _trust_command_line_endpoint(endpoint: str | None, token_file: str | None) -> str:
    """The endpoint to use; one the user typed (or gave a token for) is trusted for jobs run in this process."""
    from .. import hub

    url = hub.endpoint_url(endpoint)
    if endpoint or token_file:
        hub.trust_for_session(url, hub.read_token(token_file) if token_file else None)
    return url


def int_range(low: float, high: float | None = None, **kw) -> click.IntRange:
    """click.IntRange whose error says "'x' is not a valid integer" (click's says "integer range")."""
    kind = click.IntRange(low, high, **kw)
    kind.name = "integer"
    return kind


def float_range(low: float, high: float | None = None, **kw) -> click.FloatRange:
    """click.FloatRange whose error says "'x' is not a valid number" (click's says "float range")."""
    kind = click.FloatRange(low, high, **kw)
    kind.name = "number"
    return kind
