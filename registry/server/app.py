"""The catalog server's FastAPI application: routers, the one JSON error shape, the OpenAPI document.

Three routers over the same catalog and store: the registry's own JSON API under /v1 (api.py), the Hugging Face
compatible endpoint at the root (hf.py) and the web page (web.py). HF comes before the web page, whose
`/models/{ref:path}` would otherwise take `/models/x/resolve/main/config.json`, a download of an artifact named
`models/x`.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import (EXIT_FAILED, EXIT_FORBIDDEN, EXIT_NOT_FOUND, EXIT_USAGE, BadInput, Conflict, DatabaseLocked,
                      DatabaseUnavailable, Forbidden, NotFound, RegistryError, Unauthorized)
from .auth import ROLE_KEY, LoginRequired, need

log = logging.getLogger("registry.server")
STATIC_DIR = Path(__file__).parent / "static"

# HTTP status and error code for each error class (the most specific first); exit_code travels with them so the
# CLI against a server (REGISTRY_URL) exits as it would locally.
_STATUS: list[tuple[type[RegistryError], int, str]] = [
    (Unauthorized, 401, "unauthorized"),
    (Forbidden, 403, "forbidden"),
    (NotFound, 404, "not_found"),
    (Conflict, 409, "conflict"),
    (BadInput, 422, "bad_input"),
    (DatabaseUnavailable, 503, "failed"),
    (DatabaseLocked, 503, "failed"),
    (RegistryError, 409, "failed"),  # the operation ran but could not succeed (a corrupt artifact, a failed job)
]


def error_body(code: str, message: str, exit_code: int) -> dict[str, Any]:
    """The one JSON error shape of every /v1 route (and of auth failures anywhere)."""
    return {"error": {"code": code, "message": message, "exit_code": exit_code}}


def error_response(exc: RegistryError) -> JSONResponse:
    status, code = next((s, c) for cls, s, c in _STATUS if isinstance(exc, cls))
    message = _one_line(str(exc))
    # HF clients print X-Error-Message (ASCII, one line) rather than the JSON body.
    headers = {"X-Error-Message": message.encode("ascii", "replace").decode()}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="registry"'
    return JSONResponse(error_body(code, message, exc.exit_code), status_code=status, headers=headers)


def _one_line(message: str) -> str:
    lines = message.strip().splitlines()
    return lines[0] if lines else "error"


async def _registry_error(request: Request, exc: RegistryError):
    if isinstance(exc, LoginRequired):  # a page: the login form (with 401), not JSON
        from .web import login_response

        return login_response(request, str(exc))
    return error_response(exc)


async def _validation_error(request: Request, exc: RequestValidationError):
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or "request"
    message = f"{where}: {first.get('msg', 'invalid value')}"
    return JSONResponse(error_body("bad_input", message, EXIT_USAGE), status_code=422)


async def _http_error(request: Request, exc: StarletteHTTPException):
    code = {404: "not_found", 405: "bad_input"}.get(exc.status_code, "failed")
    exit_code = {404: EXIT_NOT_FOUND, 405: EXIT_USAGE}.get(exc.status_code, EXIT_FAILED)
    message = "no such route; see /docs" if exc.status_code == 404 else str(exc.detail)
    return JSONResponse(error_body(code, message, exit_code), status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


async def _unexpected(request: Request, exc: Exception):
    # A bug: the traceback goes to the server log (never a token: requests are not logged with their headers).
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return JSONResponse(error_body("internal", f"internal error ({type(exc).__name__}); see the server log",
                                   EXIT_FAILED), status_code=500)


class RefuseNul:
    """Answer 422 to a request whose path or query holds a NUL character, before any route sees it: PostgreSQL
    refuses NUL in text (a 500 otherwise), and no name, tag, path or search term can hold one.

    Plain ASGI, not BaseHTTPMiddleware, which would pass every streamed download through a memory queue."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and ("\x00" in scope["path"] or "%00" in scope.get("query_string", b"").decode(
                "latin-1") or b"\x00" in scope.get("query_string", b"")):
            response = JSONResponse(error_body("bad_input", "the request's path or query holds a NUL character",
                                               EXIT_USAGE), status_code=422)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def create_app(reg, allow_anonymous_read: bool = False) -> FastAPI:
    """The catalog server for a Registry. `allow_anonymous_read`: browsing and downloading need no token."""
    from . import api, apidocs, hf, web

    app = FastAPI(title="registry", summary="A model artifact registry: the team catalog and an HF-compatible "
                  "endpoint", version=_version(), openapi_url=None, docs_url=None, redoc_url=None)
    app.add_middleware(RefuseNul)
    app.state.reg = reg
    app.state.anonymous = allow_anonymous_read
    app.add_exception_handler(RegistryError, _registry_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    if hasattr(hf, "HFError"):  # the HF endpoint answers in the Hub's error format (X-Error-Code headers)
        app.add_exception_handler(hf.HFError, hf.handle_error)

    # The API description needs a token like everything else: it is the route table.
    @app.get("/openapi.json", include_in_schema=False, **need("read"))
    def openapi() -> JSONResponse:
        return JSONResponse(_with_bearer_auth(app.openapi()))

    @app.get("/docs", include_in_schema=False, **need("read", page=True))
    def docs():
        return apidocs.docs_page()

    for module in (api, hf, web):
        for router in getattr(module, "routers", [module.router]):
            app.include_router(router)
    app.include_router(apidocs.router)  # /static/swagger-ui/*: before the /static mount, which would take them
    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _with_bearer_auth(schema: dict[str, Any]) -> dict[str, Any]:
    """Declare the bearer token once for every operation that needs a role, so /docs offers "Authorize" and
    clients generated from the schema send it (the web login's cookie counts for reads only)."""
    schema.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = {
        "type": "http", "scheme": "bearer", "description": "a token from `registry token create NAME --role ROLE`"}
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            if isinstance(operation, dict) and ROLE_KEY in operation:
                operation.setdefault("security", [{"bearer": []}])
    return schema


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("registry")
    except PackageNotFoundError:
        return "0"


def app_from_env() -> FastAPI:
    """uvicorn's factory for `registry serve --workers N` (each worker process builds its own app)."""
    from ..core import Registry

    reg = Registry(os.environ.get("REGISTRY_HOME") or None, os.environ.get("REGISTRY_DATABASE_URL") or None)
    return create_app(reg, allow_anonymous_read=os.environ.get("REGISTRY_SERVE_ANONYMOUS_READ") == "1")
