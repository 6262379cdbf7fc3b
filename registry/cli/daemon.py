"""`registry daemon` (run the supervisor) and `registry daemon status`."""
from __future__ import annotations

import sys
import time
from datetime import datetime
from typing import Any

import click

from .. import render
from ..errors import NotFound
from . import cli
from .common import RegistryHolder, _reg, float_range, int_range, json_option


@cli.group("daemon", invoke_without_command=True)
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="The config file (TOML; default: <home>/daemon.toml, else built-in defaults).")
@click.option("--workers", type=int_range(1),
              help="Run one pool of N workers for every job type instead of the config's pools.")
@click.option("--watch", "watch_dirs", multiple=True, type=click.Path(file_okay=False), metavar="DIR",
              help="Also watch this drop folder, with default settings (repeatable).")
@click.option("--metrics", metavar="HOST:PORT", help="Serve /metrics, /healthz and /status here.")
@click.option("--log-format", type=click.Choice(["text", "json"]), help="Log lines as text or JSON objects.")
@click.option("--grace", type=float_range(0),
              help="Seconds a running job may take to finish after SIGTERM before it is re-queued [default: 30].")
@click.option("--check", is_flag=True, help="Check the config, print what would run, and exit (2 on problems).")
@click.pass_context
def daemon(ctx: click.Context, config_file: str | None, workers: int | None, watch_dirs: tuple[str, ...],
           metrics: str | None, log_format: str | None, grace: float | None, check: bool) -> None:
    """Run the management daemon: worker pools, watch folders, follow, pipelines, schedules, metrics.

    One per host. It keeps pools of `registry worker` processes running (restarted with backoff when they
    die; their jobs are taken over at once), and runs the services that queue work by themselves. The config
    is checked whole at start: every problem is listed and nothing starts (exit 2). SIGTERM or Ctrl-C drains
    (running jobs finish within --grace, else go back to the queue) and exits 0; SIGHUP reloads the config
    (a config with problems is logged and the running one kept). A second daemon on the same SQLite home is
    refused (exit 1); any number may share a PostgreSQL catalog. `registry daemon status` shows what it does.

    \b
    Examples:
      registry daemon
      registry daemon --config /etc/registry/daemon.toml --log-format json
      registry daemon --workers 4 --watch /data/drop --metrics 127.0.0.1:9464
      registry daemon --check
      registry daemon status
    """
    if ctx.invoked_subcommand is not None:
        given = [name for name, value in ctx.params.items() if value not in (None, (), False)]
        if given:
            raise click.UsageError(f"--{given[0].replace('_', '-')} belongs to `registry daemon` itself, not to "
                                   f"`registry daemon {ctx.invoked_subcommand}`")
        return
    from ..daemon import config as daemon_config

    holder = ctx.find_object(RegistryHolder)
    home = holder.settings.home
    path = daemon_config.config_path(home, config_file)
    overrides = daemon_config.Overrides(workers, tuple(watch_dirs), metrics, log_format, grace)

    def load() -> daemon_config.DaemonConfig:
        # On SIGHUP: the same file (it may have been created since), the same command-line flags on top.
        return daemon_config.load(daemon_config.config_path(home, config_file), overrides)

    config = daemon_config.load(path, overrides)  # ConfigErrors: every problem, exit 2, nothing started
    from ..daemon.supervisor import check_services, run_daemon

    check_services(holder.get(), config)  # allowed roots, trusted endpoints: also for --check, also exit 2
    if check:
        _print_check(config)
        return
    debug = bool(ctx.find_root().params.get("debug"))
    sys.exit(run_daemon(holder.get(), config, load, debug))


def _print_check(config) -> None:
    from ..daemon.pools import detect_gpus, worker_gpus

    detected = detect_gpus()
    click.echo(f"config ok: {config.source}")
    for name, pool in config.pools.items():
        gpus = worker_gpus(pool, detected)
        pinned = f"; GPUs {', '.join(g for g in gpus if g)}" if any(gpus) else ""
        click.echo(f"pool {name}: {len(gpus)} worker(s) for {', '.join(pool.jobs)}{pinned}")
    for label, items in (("watch", config.watches), ("follow", config.follows), ("pipeline", config.pipelines)):
        for item in items:
            what = getattr(item, "path", None) or getattr(item, "repo", None) or getattr(item, "name", item)
            click.echo(f"{label}: {what}")
    schedules = config.schedules.schedules() if config.schedules is not None else []
    for schedule in schedules:
        click.echo(f"schedule: {schedule.job_type} every {schedule.every:g}s")
    click.echo(f"grace {config.grace:g}s; log format {config.log_format}; metrics "
               f"{'%s:%s' % config.metrics if config.metrics else 'off'}")


@daemon.command("status")
@json_option
def status(as_json: bool) -> None:
    """Show the daemons running on this home: pools, workers, their jobs with progress, services.

    Read from the state file each daemon writes (every few seconds and on every change) and, for the jobs,
    from the catalog. Exits 3 when no daemon is running.

    \b
    Examples:
      registry daemon status
      registry daemon status --json
    """
    from ..daemon import state
    from ..jobs import this_host

    reg = _reg()
    daemons = [d for d in state.read_all(reg.home, this_host()) if d["running"]]
    if not daemons:
        raise NotFound(f"no registry daemon is running on {reg.home}; start one with: registry daemon")
    state.attach_jobs(reg, daemons)
    if as_json:
        render.emit_json({"daemons": daemons})
        return
    for i, d in enumerate(daemons):
        if i:
            click.echo()
        _print_daemon(d)


def _print_daemon(d: dict[str, Any]) -> None:
    started = datetime.fromtimestamp(d["started_at"]).isoformat(sep=" ", timespec="seconds")
    click.echo(f"daemon pid {d['pid']} on {d.get('hostname')}: {d.get('phase')} since {started} "
               f"(up {_ago(d['started_at'])}); config {d.get('config')}")
    extras = [f"metrics {d['metrics']}" if d.get("metrics") else None, f"grace {d.get('grace'):g}s"]
    click.echo("  " + "; ".join(e for e in extras if e))
    for name, pool in (d.get("pools") or {}).items():
        click.echo(f"  pool {name}: {pool['size']} worker(s) for {', '.join(pool['jobs'])}")
        for w in pool["workers"]:
            who = f"pid {w['pid']}" if w.get("alive") else f"restarting ({w.get('last_exit')})"
            extra = (f" gpu {w['gpu']}" if w.get("gpu") else "") + (f" restarts {w['restarts']}" if w["restarts"] else "")
            running = "; ".join(_job_text(j) for j in w.get("jobs", [])) or "idle"
            click.echo(f"    {who}{extra}: {running}")
    for w in d.get("retiring") or []:
        click.echo(f"  stopping after its job (config changed): pool {w['pool']} pid {w['pid']}")
    services = d.get("services") or []
    if services:
        click.echo("  services:")
    for svc in services:
        ticked = f"last tick {_ago(svc['last_tick_at'])} ago" if svc.get("last_tick_at") else "not run yet"
        error = f"; error: {svc['last_error']}" if svc.get("last_error") else ""
        summary = f"; {svc['summary']}" if svc.get("summary") else ""  # e.g. schedules: every, last run, next due
        click.echo(f"    {svc.get('name')}: {ticked}{summary}{error}")
        for waiting in svc.get("waiting") or []:  # a watch's folders not imported yet, and why
            click.echo(f"      {waiting['folder']}: {waiting['why']}")


def _job_text(job: dict[str, Any]) -> str:
    text = f"job {job['id']} {job['type']}"
    done, total, unit = job.get("progress_done") or 0, job.get("progress_total"), job.get("progress_unit")
    if total:
        amount = (f"{render.human_size(done)} of {render.human_size(total)}" if unit == "B"
                  else f"{done}/{total} {unit or ''}".strip())
        text += f" {100 * done // total}% ({amount})"
    return text + (f" attempt {job['attempts']}" if job.get("attempts", 1) > 1 else "")


def _ago(timestamp: float) -> str:
    s = max(0, int(time.time() - float(timestamp)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"
