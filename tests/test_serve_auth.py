"""Every route of `registry serve`, read from the app's route table, refuses callers without the right token.

Generated from create_app(...).routes, so a route added later (API, web page or HF endpoint) is covered without
editing this file, and a route that forgets `need(role)` fails here unless its path is public
(auth.PUBLIC_PATHS). For each route and method: no token -> 401, a token of a lower role -> 403, a revoked token
-> 401, a token of the role it declares -> neither. With --allow-anonymous-read, read routes answer without a
token and the others still need one.
"""
from __future__ import annotations

import re

import httpx
import pytest

from serving import make_token, serve_in_thread

from registry import Registry
from registry.schema import TOKEN_ROLES
from registry.server import create_app
from registry.server.auth import PUBLIC_PATHS, ROLE_KEY

pytestmark = pytest.mark.parametrize("home", ["sqlite", "postgresql"], indirect=True)

PARAM = re.compile(r"\{[^}]+\}")


def route_table(app) -> list[tuple[str, str, str | None]]:
    """(path, method, declared role) for every route the app serves, routers included (FastAPI keeps an
    included router as one entry whose effective routes carry the full path), mounts as (path, "*", None)."""
    def entry(path: str, route) -> list[tuple[str, str, str | None]]:
        methods = getattr(route, "methods", None)
        if not methods:
            return [(path, "*", None)]  # a mount (static files)
        role = (getattr(route, "openapi_extra", None) or {}).get(ROLE_KEY)
        return [(path, m, role) for m in sorted(methods)]

    rows = []
    for route in app.routes:
        if hasattr(route, "effective_route_contexts"):
            for ctx in route.effective_route_contexts():
                rows += entry(ctx.path, ctx.original_route)
        else:
            rows += entry(route.path, route)
    return rows


def is_public(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in PUBLIC_PATHS)


def concrete(path: str) -> str:
    """The path with every parameter filled in ("1": a valid job id, ref, name and file path alike)."""
    return PARAM.sub("1", path)


@pytest.fixture
def routes(home):
    reg = Registry()
    reg.init()
    table = route_table(create_app(reg))
    assert len(table) > 20 and any(p.startswith("/api/models") for p, _, _ in table), table  # the walk found them
    return reg, [(p, m, role) for p, m, role in table if not is_public(p)]


def test_every_route_declares_its_role(routes):
    reg, table = routes
    undeclared = [(p, m) for p, m, role in table if role not in TOKEN_ROLES]
    assert not undeclared, f"routes without need(role) and not in auth.PUBLIC_PATHS: {undeclared}"
    with serve_in_thread(reg) as url:
        doc = httpx.get(url + "/openapi.json", headers={"Authorization": f"Bearer {make_token(reg, 'read')}"}).json()
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            assert is_public(path) or operation.get(ROLE_KEY) in TOKEN_ROLES, (method, path)


def test_missing_wrong_and_revoked_tokens_are_refused_on_every_route(routes):
    reg, table = routes
    secrets = {role: make_token(reg, role) for role in TOKEN_ROLES}
    revoked = make_token(reg, "admin", "revoked-admin")
    from registry.tokens import revoke_token

    with reg.session() as s:
        revoke_token(s, "revoked-admin")
    refused = []
    with serve_in_thread(reg) as url, httpx.Client(base_url=url, timeout=30) as c:
        def status(method: str, path: str, secret: str | None) -> int:
            headers = {"Authorization": f"Bearer {secret}"} if secret else {}
            return c.request(method, concrete(path), headers=headers).status_code

        for path, method, role in table:
            got = {"none": status(method, path, None), "revoked": status(method, path, revoked),
                   "garbage": status(method, path, "rgt_not-a-token")}
            lower = TOKEN_ROLES[:TOKEN_ROLES.index(role)]
            got.update({f"role {r}": status(method, path, secrets[r]) for r in lower})
            want = {"none": 401, "revoked": 401, "garbage": 401, **{f"role {r}": 403 for r in lower}}
            right = status(method, path, secrets[role])
            if got != want or right in (401, 403):
                refused.append((method, path, role, got, right))
    assert not refused, "\n".join(map(str, refused))


def test_anonymous_read_opens_read_routes_only(routes):
    reg, table = routes
    wrong = []
    with serve_in_thread(reg, anonymous=True) as url, httpx.Client(base_url=url, timeout=30) as c:
        for path, method, role in table:
            got = c.request(method, concrete(path)).status_code
            if (role == "read") == (got in (401, 403)) or (role != "read" and got != 401):
                wrong.append((method, path, role, got))
        who = c.get("/v1/whoami").json()
        stale = c.get("/v1/whoami", headers={"Authorization": "Bearer rgt_revoked-or-unknown"})
    assert not wrong, wrong
    assert who == {"token": None, "role": "read"}
    assert stale.status_code == 401  # a stale token is refused, not silently downgraded to anonymous
