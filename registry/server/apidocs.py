"""/docs: Swagger UI over /openapi.json, served from this server (no CDN: a team network may be offline, and a
third-party script would run on the logged-in origin).

The Swagger UI files come from the `fastapi-offline` package (the `serve` extra), which ships swagger-ui 5's
dist files (swagger-ui-bundle 1.1.0 has swagger-ui 4.15, which cannot read FastAPI's OpenAPI 3.1 document; it
shows "Unable to render this definition"). Only its files are used, not its app class. The page loads two scripts
from this origin and starts Swagger UI from /static/docs.js, not an inline script, so it keeps the web pages'
Content-Security-Policy (script-src 'self').
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse

from ..errors import NotFound
from .web import SECURITY_HEADERS

router = APIRouter()

PREFIX = "/static/swagger-ui"
# Only what the page uses.
FILES = {"swagger-ui-bundle.js": "text/javascript; charset=utf-8", "swagger-ui.css": "text/css; charset=utf-8",
         "favicon.png": "image/png"}
CACHE = "public, max-age=86400"  # the files change only with the installed package

PAGE = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>registry API</title>
<link rel="stylesheet" href="{PREFIX}/swagger-ui.css">
<link rel="icon" type="image/png" href="{PREFIX}/favicon.png">
</head>
<body>
<div id="swagger-ui"><noscript>The API browser needs JavaScript; the description itself is /openapi.json.</noscript></div>
<script src="{PREFIX}/swagger-ui-bundle.js"></script>
<script src="/static/docs.js"></script>
</body>
</html>
"""


def swagger_dir() -> Path | None:
    """The folder of swagger-ui's dist files, or None when fastapi-offline is not installed."""
    spec = importlib.util.find_spec("fastapi_offline")  # not imported: only its package data is needed
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "static"
    return folder if (folder / "swagger-ui-bundle.js").is_file() else None


def docs_page() -> HTMLResponse:
    """The /docs page (the route itself, with its read token check, is in app.py)."""
    if swagger_dir() is None:
        raise NotFound("the API browser needs the fastapi-offline package (pip install 'registry[serve]'); "
                       "the API description is /openapi.json")
    return HTMLResponse(PAGE, headers=SECURITY_HEADERS)


# Public like the rest of /static (auth.PUBLIC_PATHS): swagger-ui's own files, nothing about the catalog.
@router.get(PREFIX + "/{name}", include_in_schema=False)
def swagger_file(name: str) -> FileResponse:
    folder = swagger_dir()
    if name not in FILES or folder is None:
        raise NotFound(f"no file {name} in {PREFIX}")
    return FileResponse(folder / name, media_type=FILES[name],
                        headers={"Cache-Control": CACHE, "X-Content-Type-Options": "nosniff"})
