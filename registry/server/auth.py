"""Who is calling: a bearer token (or the web login's cookie), its role, and sessions that record the caller.

Every route declares the role it needs with `need(role)`, which both checks it and writes it into the OpenAPI
operation (`x-registry-role`), so the auth tests can walk the route table: a route without it is a test failure,
unless its path is one of PUBLIC_PATHS.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
import logging
from typing import Any, Iterator

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from ..errors import DatabaseLocked, DatabaseUnavailable, Forbidden, Unauthorized

log = logging.getLogger("registry.server")

ROLE_KEY = "x-registry-role"
COOKIE = "registry_token"  # set by the web login (web.py); HttpOnly, SameSite=Strict
# Reachable without a token: the health check (load balancers, compose), the login page and its assets.
PUBLIC_PATHS = ("/v1/health", "/login", "/logout", "/static")


@dataclass(frozen=True)
class Caller:
    """The authenticated caller of one request: a token's name and role, or anonymous (read only)."""

    token: str | None
    role: str

    @property
    def actor(self) -> str:
        """What events record as the one who did it (never the secret)."""
        return f"token:{self.token}" if self.token else "anonymous"


class LoginRequired(Unauthorized):
    """A page (not an API route) was asked for without a valid token: answer with the login form."""


def bearer_secret(request: Request) -> str | None:
    """The token a request carries: `Authorization: Bearer <token>` (what HF clients send), else the login cookie.
    A malformed Authorization header counts as a wrong token (""), not as no token.

    The cookie counts only for GET and HEAD: the web page only reads, and a cookie that authorized a POST could
    be used by any page a logged-in user visits (SameSite=Strict does not stop a page on another port of the
    same host). Changes need the header, which another origin's page cannot set without a CORS preflight."""
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, value = header.strip().partition(" ")
        return value.strip() if scheme.lower() == "bearer" else ""
    if request.method in ("GET", "HEAD"):
        return request.cookies.get(COOKIE)
    return None


def authenticate(request: Request) -> Caller | None:
    """The caller of this request, or None when it has no token and anonymous reading is off.

    A token that is given but unknown or revoked is refused even when anonymous reading is on: a client that
    sends a stale token should learn so rather than silently get less."""
    from .. import tokens

    secret = bearer_secret(request)
    if secret is None:
        return Caller(None, "read") if request.app.state.anonymous else None
    if not secret:
        raise Unauthorized("malformed Authorization header; send 'Authorization: Bearer <token>'")
    reg = request.app.state.reg
    with reg.read_session() as s:
        info = tokens.authenticate(s, secret)
    if info is None:
        raise Unauthorized("unknown or revoked token; create one with `registry token create NAME --role read`")
    if tokens.needs_touch(info):  # at most one write a minute per token, not one per request
        try:
            with reg.session() as s:
                tokens.mark_used(s, info.id)
        except (DatabaseLocked, DatabaseUnavailable) as exc:  # a busy catalog must not fail the download
            log.warning("could not record that token %s was used: %s", info.name, exc)
    return Caller(info.name, info.role)


def need(role: str, page: bool = False) -> dict[str, Any]:
    """Keyword arguments for a route decorator: `@router.get(path, **need("read"))`.

    Checks the caller has at least `role` (read < write < admin): no token or an unknown/revoked one is 401
    (`page=True`: the login form with 401), a lower role 403."""
    from ..tokens import role_allows

    def check(request: Request) -> Caller:
        try:
            caller = authenticate(request)
        except Unauthorized as exc:
            raise (LoginRequired(str(exc)) if page else exc) from None
        if caller is None:
            message = "this server needs a token: send 'Authorization: Bearer <token>' (HF clients: set HF_TOKEN)"
            raise LoginRequired(message) if page else Unauthorized(message)
        if not role_allows(caller.role, role):
            if caller.token is None:  # anonymous reading is on, but this needs more: authenticate first (401)
                message = f"this needs {_a(role)} token: send 'Authorization: Bearer <token>'"
                raise LoginRequired(message) if page else Unauthorized(message)
            raise Forbidden(f"this needs {_a(role)} token; token {caller.token!r} has the {caller.role} role")
        request.state.caller = caller
        return caller

    return {"dependencies": [Depends(check)], "openapi_extra": {ROLE_KEY: role}}


def _a(role: str) -> str:
    return f"an {role}" if role[0] in "aeiou" else f"a {role}"


def current_caller(request: Request) -> Caller:
    """The caller `need()` authenticated (use as `caller: Caller = Depends(current_caller)`)."""
    caller = getattr(request.state, "caller", None)
    if caller is None:  # a public route: whoever it is, it is not authenticated
        return Caller(None, "read")
    return caller


@contextlib.contextmanager
def session_for(request: Request, write: bool = False) -> Iterator[Session]:
    """A catalog session for this request; events it records name the caller (`events.actor`)."""
    reg = request.app.state.reg
    if not write:
        with reg.read_session() as s:
            yield s
        return
    with reg.session() as s:
        s.info["actor"] = current_caller(request).actor
        yield s
