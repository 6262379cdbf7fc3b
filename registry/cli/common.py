"""Helpers shared by the command modules: the registry of the current command, running jobs, common options."""
from __future__ import annotations

import click

from .. import render
from ..core import Registry
from ..errors import error_for
from ..progress import terminal_reporter

json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
detach_option = click.option("--detach", is_flag=True, help="Queue the job for a worker and return at once.")


def _reg() -> Registry:
    return click.get_current_context().obj


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
