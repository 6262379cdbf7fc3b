"""The catalog commands against a catalog server (REGISTRY_URL): each function returns what its local command
computes from the database (a summary list, an artifact's details, a finished job), so the command renders it
with the same code either way.

What a server cannot do for this machine is refused with one line (exit 2): options that name a file or folder
here (the server cannot read them) and the commands that work on a local store (import, export, path, ...).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import click

from .. import render
from ..errors import BadInput, error_for
from ..progress import terminal_reporter
from ..remote import URL_ENV, Client, ref_path

PAGE = 500  # artifacts per request while `list` walks the whole catalog


@dataclass
class RemoteJob:
    """A finished job as GET /v1/jobs/{id} describes it: the fields the commands read from a local Job."""

    id: int
    type: str
    state: str
    result: dict[str, Any] | None
    exit_code: int | None
    error: str | None
    message: str | None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RemoteJob:
        return cls(d["id"], d["type"], d["state"], d.get("result"), d.get("exit_code"), d.get("error"),
                   d.get("message"))


def refuse_host_path(option: str, value: str | None) -> None:
    """An option naming a file or folder on this machine, with REGISTRY_URL set: refused (exit 2)."""
    if value is not None:
        raise BadInput(f"{option} {value} is a path on this machine; the server at {URL_ENV} cannot read it "
                       f"(unset {URL_ENV} to use a local registry)")


def refuse(command: str, why: str) -> None:
    """A command (or option) that a catalog server does not offer (exit 2)."""
    raise BadInput(f"{command} {why}; {URL_ENV} is set (unset it to use a local registry)")


# --- read commands ---

def artifact_list(kind: str | None, deleted: bool) -> list[dict[str, Any]]:
    """`registry list`: every artifact, page by page (the server caps a page)."""
    items: list[dict[str, Any]] = []
    with Client() as c:
        while True:
            page = c.get("/v1/artifacts", kind=kind, deleted=str(deleted).lower(), limit=PAGE, offset=len(items))
            items.extend(page["items"])
            if not page["items"] or len(items) >= page["total"]:
                return items


def details(ref: str) -> dict[str, Any]:
    """`registry show`."""
    with Client() as c:
        return c.get(f"/v1/artifacts/{ref_path(ref)}")


def manifest(ref: str) -> dict[str, Any]:
    """`registry manifest --json`: {digest, manifest, metadata, provenance}."""
    with Client() as c:
        return c.get(f"/v1/artifacts/{ref_path(ref)}/manifest")


def job_list(state: str | None, limit: int) -> list[dict[str, Any]]:
    """`registry jobs`."""
    with Client() as c:
        return c.get("/v1/jobs", state=state, limit=limit)


def job(job_id: int) -> dict[str, Any]:
    """`registry job ID`."""
    with Client() as c:
        return c.get(f"/v1/jobs/{job_id}")


# --- changes ---

def cancel(job_id: int) -> dict[str, Any]:
    """`registry cancel ID`: {job, state, cancelled}."""
    with Client() as c:
        return c.post(f"/v1/jobs/{job_id}/cancel")


def set_tag(ref: str, tag: str) -> dict[str, Any]:
    """`registry tag REF TAG`: {tag, name, digest, previous}."""
    with Client() as c:
        return c.put(f"/v1/tags/{ref_path(tag)}", {"ref": ref})


def remove(ref: str, force: bool) -> dict[str, Any]:
    """`registry rm REF` (an admin token): {name, digest, tags}."""
    with Client() as c:
        return c.delete(f"/v1/artifacts/{ref_path(ref)}", force=str(force).lower())


# --- tokens (an admin token on the server) ---

def token_create(name: str, role: str) -> dict[str, Any]:
    """`registry token create`: {token, name, role, prefix, created_at, ...}; the secret is in this answer only."""
    with Client() as c:
        return c.post("/v1/tokens", {"name": name, "role": role})


def token_list(include_revoked: bool) -> list[dict[str, Any]]:
    """`registry token list`: TokenInfo dicts, oldest first."""
    with Client() as c:
        return c.get("/v1/tokens", all=str(include_revoked).lower())


def token_revoke(name: str) -> dict[str, Any]:
    """`registry token revoke NAME`: the revoked token's TokenInfo dict."""
    with Client() as c:
        segment = quote(name, safe="@")  # one path segment; '.' and '..' escaped so no client folds them away
        return c.delete(f"/v1/tokens/{segment.replace('.', '%2E') if segment in ('.', '..') else segment}")


def run(body: dict[str, Any], detach: bool, as_json: bool, path: str = "/v1/jobs") -> RemoteJob | None:
    """Submit a job and, unless detached, wait for it with a progress bar on a terminal; what `_run` does
    locally: a failed job raises its error (exit code included) unless it has a result to show (verify)."""
    with Client() as c:
        posted = c.post(path, body)
        job_id = posted["job"]
        if detach:
            data = {"job": job_id, "state": posted["state"]}
            render.emit_json(data) if as_json else click.echo(
                f"queued job {job_id}; watch it with: registry job {job_id}")
            return None
        try:
            final = RemoteJob.from_dict(c.wait_for_job(job_id, None if as_json else terminal_reporter()))
        except KeyboardInterrupt:
            _interrupted(c, job_id, posted)
            raise
    if final.state != "succeeded" and not (final.result and final.exit_code == 1):
        raise error_for(final.exit_code, final.error or final.message or f"job {final.id} {final.state}")
    return final


def _interrupted(c: Client, job_id: int, posted: dict[str, Any]) -> None:
    """Ctrl-C while waiting: as locally, a job this command queued is cancelled; one it found already queued
    (the same request from someone else) goes on."""
    if posted.get("created"):
        try:
            c.post(f"/v1/jobs/{job_id}/cancel")
            click.echo(f"job {job_id} on {c.url}: cancel requested", err=True)
            return
        except Exception:  # the server may be why the user gave up; say how to cancel it later
            pass
    click.echo(f"job {job_id} goes on at {c.url}; stop it with: registry cancel {job_id}", err=True)
