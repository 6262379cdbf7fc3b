"""Job queue commands: jobs, job, cancel, worker."""
from __future__ import annotations

import sys

import click

from .. import remote, render
from ..schema import DEFAULT_LEASE_SECONDS, JOB_STATES, JOB_TYPES, MAX_ID
from . import cli
from . import remote as remote_cli
from .common import _reg, float_range, int_range, jobs, json_option  # jobs: imported on first use (common.py)


@cli.command("jobs")
@click.option("--state", type=click.Choice(JOB_STATES), help="Only jobs in this state.")
@click.option("--limit", default=50, show_default=True, type=int_range(1), help="Show at most this many.")
@json_option
def jobs_(state: str | None, limit: int, as_json: bool) -> None:
    """List jobs, newest first.

    \b
    Examples:
      registry jobs --state running
      registry jobs --state failed --limit 5 --json
    """
    if remote.configured():
        items = remote_cli.job_list(state, limit)
    else:
        with _reg().read_session() as s:
            items = [jobs.job_dict(j) for j in jobs.list_jobs(s, state, limit)]
    if as_json:
        render.emit_json(items)
    else:
        render.table([render.job_line(j) for j in items], ["ID", "TYPE", "STATE", "TRIES", "PROGRESS", "MESSAGE"])


@cli.command()
@click.argument("job_id", type=int_range(1, MAX_ID))
@json_option
def job(job_id: int, as_json: bool) -> None:
    """Show one job: state, attempts, progress, result or error.

    \b
    Examples:
      registry job 12
      registry job 12 --json
    """
    if remote.configured():
        data = remote_cli.job(job_id)
    else:
        with _reg().read_session() as s:
            data = jobs.job_dict(jobs.get(s, job_id))
    render.emit_json(data) if as_json else render.job_details(data)


@cli.command()
@click.argument("job_id", type=int_range(1, MAX_ID))
@json_option
def cancel(job_id: int, as_json: bool) -> None:
    """Cancel a queued job, or ask a running one to stop at its next progress update.

    A job that has already finished (succeeded, failed or cancelled) is left as it is: the command says so
    and exits 0, since the job is not running either way (`--json` gives "cancelled": false).

    \b
    Examples:
      registry cancel 12
      registry cancel 12 --json
    """
    if remote.configured():
        data = remote_cli.cancel(job_id)
    else:
        with _reg().session() as s:
            before = jobs.get(s, job_id).state
            data = {"job": job_id, "state": jobs.cancel(s, job_id).state, "cancelled": before in ("queued", "running")}
    state = data["state"]
    if as_json:
        render.emit_json(data)
    elif not data["cancelled"]:
        click.echo(f"job {job_id} already {state}; nothing to cancel")
    elif state == "cancelled":  # it was queued: cancelled at once
        click.echo(f"job {job_id} cancelled before it ran")
    else:  # it was running: it stops at its next heartbeat
        click.echo(f"job {job_id}: cancel requested; it stops at its next progress update (see registry job {job_id})")


@cli.command()
@click.option("--once", is_flag=True, help="Exit when no job is left to run.")
@click.option("--lease", default=DEFAULT_LEASE_SECONDS, show_default=True, type=float_range(1),
              help="Seconds a claimed job stays ours without a heartbeat.")
@click.option("--poll", default=1.0, show_default=True, type=float_range(0, min_open=True),
              help="Seconds between looks at the queue when nothing announced a job (a retry's backoff ending).")
@click.option("--grace", default=30.0, show_default=True, type=float_range(0),
              help="Seconds the current job may take to finish after SIGTERM/SIGINT before it is re-queued.")
@click.option("--type", "types", multiple=True, type=click.Choice(JOB_TYPES),
              help="Run only jobs of this type (repeat for several); default: every type.")
def worker(once: bool, lease: float, poll: float, grace: float, types: tuple[str, ...]) -> None:
    """Run one worker: claim queued jobs and run them until stopped.

    An idle worker wakes when a job is queued (PostgreSQL NOTIFY; on SQLite it notices the database change
    within 0.2 s), so --poll only bounds how late a retry after its backoff starts. `registry daemon` runs
    pools of these.

    SIGTERM or Ctrl-C stops claiming and lets the current job finish (up to --grace seconds); a second one,
    or the grace running out, puts the job back in the queue for another worker and exits with code 130.

    \b
    Examples:
      registry worker
      registry worker --once
      registry worker --lease 120 --grace 300
      registry worker --type merge --type quantize
    """
    from ..errors import EXIT_INTERRUPTED, WorkerStopped
    from ..workers import worker_loop
    from ..workers.runner import configure_logging

    configure_logging(bool(click.get_current_context().find_root().params.get("debug")))
    reg = _reg()
    reg.init()
    try:
        ran = worker_loop(reg, lease_seconds=lease, poll_seconds=poll, once=once, grace_seconds=grace,
                          types=list(types) or None)
    except WorkerStopped as exc:
        click.echo(f"{exc}; it is queued again for another worker", err=True)
        sys.exit(EXIT_INTERRUPTED)
    click.echo(f"worker ran {ran} job(s)", err=True)
