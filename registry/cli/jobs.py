"""Job queue commands: jobs, job, cancel, worker."""
from __future__ import annotations

import logging
import sys

import click

from .. import jobs, render
from ..models import JOB_STATES
from . import cli
from .common import _reg, json_option


@cli.command("jobs")
@click.option("--state", type=click.Choice(JOB_STATES), help="Only jobs in this state.")
@click.option("--limit", default=50, show_default=True, help="Show at most this many.")
@json_option
def jobs_(state: str | None, limit: int, as_json: bool) -> None:
    """List jobs, newest first."""
    with _reg().read_session() as s:
        items = [jobs.job_dict(j) for j in jobs.list_jobs(s, state, limit)]
    if as_json:
        render.emit_json(items)
    else:
        render.table([render.job_line(j) for j in items], ["ID", "TYPE", "STATE", "TRIES", "PROGRESS", "MESSAGE"])


@cli.command()
@click.argument("job_id", type=int)
@json_option
def job(job_id: int, as_json: bool) -> None:
    """Show one job: state, attempts, progress, result or error."""
    with _reg().read_session() as s:
        data = jobs.job_dict(jobs.get(s, job_id))
    render.emit_json(data) if as_json else render.job_details(data)


@cli.command()
@click.argument("job_id", type=int)
def cancel(job_id: int) -> None:
    """Cancel a queued job, or ask a running one to stop."""
    with _reg().session() as s:
        j = jobs.cancel(s, job_id)
        state, requested = j.state, j.cancel_requested
    click.echo(f"job {job_id}: {'cancel requested' if state == 'running' and requested else state}")


@cli.command()
@click.option("--once", is_flag=True, help="Exit when no job is left to run.")
@click.option("--lease", default=jobs.DEFAULT_LEASE_SECONDS, show_default=True,
              help="Seconds a claimed job stays ours without a heartbeat.")
@click.option("--poll", default=1.0, show_default=True, help="Seconds between looks at an empty queue.")
@click.option("--grace", default=30.0, show_default=True, type=click.FloatRange(0),
              help="Seconds the current job may take to finish after SIGTERM/SIGINT before it is re-queued.")
def worker(once: bool, lease: float, poll: float, grace: float) -> None:
    """Run one worker: claim queued jobs and run them until stopped.

    SIGTERM or Ctrl-C stops claiming and lets the current job finish (up to --grace seconds); a second one,
    or the grace running out, puts the job back in the queue for another worker and exits with code 130.
    """
    from ..errors import WorkerStopped
    from ..workers import worker_loop

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    reg = _reg()
    reg.init()
    try:
        ran = worker_loop(reg, lease_seconds=lease, poll_seconds=poll, once=once, grace_seconds=grace)
    except WorkerStopped as exc:
        click.echo(f"{exc}; it is queued again for another worker", err=True)
        sys.exit(130)
    click.echo(f"worker ran {ran} job(s)", err=True)
