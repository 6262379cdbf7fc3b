"""The `registry` command: a thin click layer that parses, calls one library function and renders.

One module per area registers its commands on the `cli` group: artifacts (import, pull, list, show, manifest,
export, path, tag, rm, link), transform (merge, quantize, generate), convert (GGUF), integrity (verify, repair,
fsck, gc), jobs (jobs, job, cancel, worker), daemon (daemon, daemon status), serve and tokens; common holds the
helpers they share.
"""
from __future__ import annotations

import logging
import os
import sys
import traceback
from typing import NoReturn

import click

from .. import render
from ..errors import EXIT_INTERRUPTED, EXIT_USAGE, RegistryError
from .common import RegistryHolder, _reg, _safe_url, json_option

_debug = False  # set by `registry --debug`; main() then prints the traceback of an unexpected error


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", type=click.Path(file_okay=False), envvar="REGISTRY_HOME",
              help="Registry home folder (env REGISTRY_HOME; default: per-user data folder).")
@click.option("--database-url", envvar="REGISTRY_DATABASE_URL",
              help="SQLAlchemy URL of the catalog (env REGISTRY_DATABASE_URL; default: SQLite in the home).")
@click.option("--debug", is_flag=True, envvar="REGISTRY_DEBUG",
              help="Log at DEBUG level and print the traceback of an unexpected error (env REGISTRY_DEBUG=1).")
@click.version_option(package_name="registry")
@click.pass_context
def cli(ctx: click.Context, home: str | None, database_url: str | None, debug: bool) -> None:
    """A registry for LLM weights: SHA-256 manifests, lineage, verification and jobs.

    Exit codes: 0 ok, 1 operation failed, 2 usage or bad input, 3 not found, 4 not allowed (a server
    refused the token), 130 interrupted (Ctrl-C).
    """
    global _debug
    _debug = debug
    if debug:
        logging.basicConfig(level=logging.DEBUG, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    ctx.obj = RegistryHolder(home, database_url)  # the Registry (and the ORM) only when a command needs it


@cli.command()
@click.option("--home", type=click.Path(file_okay=False), help="Create the registry here instead.")
@json_option
def init(home: str | None, as_json: bool) -> None:
    """Create the home folder and migrate the catalog database to the newest schema.

    Every command does this on first use; run it to set up a home or a shared database ahead of time.

    \b
    Examples:
      registry init
      registry init --home /mnt/shared/registry
      REGISTRY_DATABASE_URL=postgresql+psycopg://user@db-host/registry registry init
    """
    database_url = click.get_current_context().find_root().params["database_url"]
    reg = RegistryHolder(home, database_url).get() if home else _reg()
    reg.init()
    info = {"home": str(reg.home), "database_url": _safe_url(reg.settings.database_url)}
    render.emit_json(info) if as_json else click.echo(f"registry ready at {info['home']} ({info['database_url']})")


def main() -> None:
    """Console entry point: every error becomes one `error: ...` line on stderr and a documented exit code."""
    try:
        cli.main(standalone_mode=False)
    except RegistryError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort as exc:  # click turns Ctrl-C (KeyboardInterrupt) into Abort
        if isinstance(exc.__cause__, KeyboardInterrupt):
            _interrupted()
        click.echo("error: aborted", err=True)
        sys.exit(1)
    except click.exceptions.NoArgsIsHelpError as exc:  # plain `registry`: the help is the answer, not an error
        click.echo(exc.ctx.get_help())
        sys.exit(0)
    except click.UsageError as exc:
        where = f"; see {exc.ctx.command_path if exc.ctx else _command_path(sys.argv[1:])} --help"
        # click lists a required Choice's values on lines of their own ("Choose from:\n\ta,\n\tb"): keep them.
        message = _one_line(_lower_first(exc.format_message().replace(":\n\t", ": ").replace(",\n\t", ", ")))
        message = message.rstrip(".")
        message = message.replace(". Did you mean ", " (did you mean ") + (")" if ". Did you mean " in message else "")
        click.echo(f"error: {message}{where}", err=True)
        sys.exit(EXIT_USAGE)
    except click.ClickException as exc:
        click.echo(f"error: {_one_line(_lower_first(exc.format_message()))}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except BrokenPipeError:
        os._exit(0)
    except KeyboardInterrupt:  # outside click's own handling (while it parses, or as it reports)
        _interrupted()
    except Exception as exc:  # a bug or an unforeseen condition: one line, the traceback only on request
        message = _one_line(str(exc))
        line = f"error: {type(exc).__name__}{': ' + message if message else ''}"
        if _debug:
            traceback.print_exc()
            click.echo(line, err=True)
        else:
            click.echo(f"{line} (rerun with --debug for the traceback)", err=True)
        sys.exit(1)


def _interrupted() -> NoReturn:
    """Ctrl-C: the job (if any) was already cancelled or given back; 130 = 128 + SIGINT, the shell's convention
    (and `registry worker`'s code when its second signal re-queues its job)."""
    click.echo("error: interrupted", err=True)
    sys.exit(EXIT_INTERRUPTED)


def _command_path(args: list[str]) -> str:
    """'registry list' for `registry list --kind`: click's parser raises 'requires an argument' without a context."""
    values = {"--home", "--database-url"}  # the group's options that take a value
    skip = False
    for arg in args:
        if skip or arg.startswith("-"):
            skip = arg in values and not skip
            continue
        return f"registry {arg}" if arg in cli.commands else "registry"
    return "registry"


def _one_line(message: str) -> str:
    """The first line of a message (database drivers append SQL and links on further lines)."""
    lines = message.strip().splitlines()
    return lines[0] + (" ..." if len(lines) > 1 else "") if lines else ""


def _lower_first(message: str) -> str:
    """click says 'No such option'; every other error line starts in lower case."""
    return message[0].lower() + message[1:] if message[:2].istitle() else message


from . import artifacts, convert, daemon, integrity, jobs, serve, tokens, transform  # noqa: E402,F401  (each registers its commands on `cli`)
