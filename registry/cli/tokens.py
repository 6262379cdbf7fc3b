"""Token commands for `registry serve`: token create, token list, token revoke."""
from __future__ import annotations

from typing import Any

import click

from .. import remote, render
from ..schema import TOKEN_ROLES
from . import cli
from . import remote as remote_cli
from .common import _reg, json_option


@cli.group("token")
def token() -> None:
    """Manage the API tokens `registry serve` accepts (Authorization: Bearer TOKEN).

    With REGISTRY_URL set, the commands manage that server's tokens (REGISTRY_TOKEN must be an admin token).

    Roles: read browses and downloads; write also submits jobs and moves tags; admin also manages tokens and
    removes artifacts. The catalog stores only a token's sha256: a token is shown once, when it is created.

    \b
    Examples:
      registry token create ci --role read
      registry token list
      registry token revoke ci
    """


@token.command("create")
@click.argument("name")
@click.option("--role", type=click.Choice(TOKEN_ROLES), required=True,
              help="What the token may do: read, write (also jobs, tags) or admin (also tokens, rm, gc).")
@json_option
def create(name: str, role: str, as_json: bool) -> None:
    """Create a token and print it, alone on stdout; it is not shown again.

    NAME (letters, digits, '.', '_', '-', '@'; at most 64) says whose or what the token is; events record
    actions as token:NAME. A note goes to stderr, so `TOKEN=$(registry token create ...)` captures the token.

    \b
    Examples:
      registry token create ci --role read
      TOKEN=$(registry token create alice@laptop --role write)
      registry token create ops --role admin --json
    """
    if remote.configured():  # on the server's catalog (an admin REGISTRY_TOKEN), not a local one
        made = remote_cli.token_create(name, role)
        secret = made["token"]
    else:
        from ..tokens import create_token

        with _reg().session() as s:
            info, secret = create_token(s, name, role)
        made = info.to_dict()
    if as_json:
        render.emit_json({"name": made["name"], "role": made["role"], "prefix": made["prefix"],
                          "created_at": made["created_at"], "token": secret})
        return
    click.echo(f"created token {made['name']} ({made['role']}); store it now, it is not shown again", err=True)
    click.echo(secret)


@token.command("list")
@click.option("--all", "include_revoked", is_flag=True, help="Include revoked tokens (with when).")
@json_option
def list_(include_revoked: bool, as_json: bool) -> None:
    """List tokens: name, role, the first characters of the secret, when created and last used.

    \b
    Examples:
      registry token list
      registry token list --all --json
    """
    if remote.configured():
        items = remote_cli.token_list(include_revoked)
    else:
        from ..tokens import list_tokens

        with _reg().read_session() as s:
            items = [t.to_dict() for t in list_tokens(s, include_revoked)]
    if as_json:
        render.emit_json(items)
        return
    if not items:
        click.echo("no tokens; create one with: registry token create NAME --role read")
        return
    headers = ["NAME", "ROLE", "PREFIX", "CREATED", "LAST USED"] + (["REVOKED"] if include_revoked else [])
    rows = [[t["name"], t["role"], t["prefix"], _when(t["created_at"]), _when(t["last_used_at"], "never")]
            + ([_when(t["revoked_at"], "-")] if include_revoked else []) for t in items]
    render.table(rows, headers)


@token.command("revoke")
@click.argument("name")
@json_option
def revoke(name: str, as_json: bool) -> None:
    """Revoke a live token: requests that send it are refused (401) from now on.

    The name is free again afterwards; `token list --all` still shows the revoked token.

    \b
    Examples:
      registry token revoke ci
      registry token revoke alice@laptop --json
    """
    if remote.configured():
        revoked = remote_cli.token_revoke(name)
    else:
        from ..tokens import revoke_token

        with _reg().session() as s:
            revoked = revoke_token(s, name).to_dict()
    render.emit_json(revoked) if as_json else click.echo(f"revoked token {revoked['name']} ({revoked['role']})")


def _when(iso: Any, missing: str = "") -> str:
    """'2026-12-06 04:00' from '2026-12-06T04:00:12.345Z' (UTC, to the minute as last_used_at is kept)."""
    return iso[:16].replace("T", " ") if iso else missing
