"""The Hugging Face compatible read endpoint: `HF_ENDPOINT=<server>` makes huggingface_hub and transformers
download artifacts from the registry unchanged (see ../shared/notes/hf-protocol.md for what they need).

Routes, each for one- and two-segment repo ids (`name` and `namespace/name`):
    GET  /api/models                                     list and search (Link pagination, absolute URLs)
    GET  /api/models/{repo}[/revision/{rev}]             model info: the commit (`sha`) and the files
    GET  /api/models/{repo}/tree/{rev}[/{path}]          files and folders (recursive=true|false)
    GET  /api/models/{repo}/refs                         main and the repo's tags
    HEAD /{repo}/resolve/{rev}/{path}, GET the same      a file's headers / bytes (Range: 206)

Revisions and commits are hfrepo.py's. Errors carry the Hub's `X-Error-Code` (RepoNotFound, RevisionNotFound,
EntryNotFound + X-Repo-Commit) and `X-Error-Message`, so clients raise their usual exceptions; an artifact that
is corrupt, or a blob that changed on disk, is refused with 409 and what to run.

Revisions and tree paths arrive percent-encoded (`refs%2Fpr%2F1`, `sub%2Ffile`); the server decodes the path
before routing, so the routes take the rest of the path as one `{rest:path}` parameter and split it again from
the raw (still encoded) path.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Callable, Iterator
from urllib.parse import unquote

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from ..schema import KINDS, MAX_ID
from . import hfrepo
from .auth import need, session_for
from .files import BlobResponse, RangeNotSatisfiable, parse_range

router = APIRouter(tags=["huggingface"])
MAX_CURSOR = MAX_ID  # a page cursor is an SQL OFFSET: bounded so that the database can take it


class HFError(Exception):
    """An error in the Hub's format: status, message, and the X-Error-Code clients map to exceptions."""

    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.commit, self.headers = status, code, commit, headers or {}


def handle_error(request: Request, exc: HFError) -> Response:
    """The response for an HFError (app.py installs this handler)."""
    message = _header_text(str(exc))
    headers = {"X-Error-Message": message, **exc.headers}
    if exc.code:
        headers["X-Error-Code"] = exc.code
    if exc.commit:
        headers["X-Repo-Commit"] = exc.commit
    return JSONResponse({"error": message}, status_code=exc.status, headers=headers)


def _header_text(message: str) -> str:
    """One line of printable ASCII: what an HTTP header can carry."""
    line = " ".join(message.split())
    return line.encode("ascii", "backslashreplace").decode("ascii")


@contextlib.contextmanager
def hub_errors() -> Iterator[None]:
    """hfrepo's errors as HFError: 404 with the Hub's error code, 409 for what must not be served."""
    try:
        yield
    except (hfrepo.RepoNotFound, hfrepo.RevisionNotFound, hfrepo.EntryNotFound) as exc:
        raise HFError(404, str(exc), exc.hf_code, getattr(exc, "commit", None)) from None
    except hfrepo.NotServable as exc:
        raise HFError(409, str(exc)) from None


def _raw_tail(request: Request) -> list[str]:
    """The segments of `{rest:path}`, split on the raw path's slashes, then each percent-decoded."""
    raw = request.scope.get("raw_path") or request.scope["path"].encode()
    root = request.scope.get("root_path", "").encode()
    if root and raw.startswith(root):
        raw = raw[len(root):]
    template = request.scope["route"].path.split("/")
    segments = raw.decode("latin-1").split("/")
    start = template.index("{rest:path}")
    if len(segments) <= start or segments[start - 1] != template[start - 1]:
        # An encoded slash in the repo id shifted the segments: no repo id has one.
        raise HFError(404, "no such repo: a repo id has at most one '/'", "RepoNotFound")
    return [unquote(s, errors="surrogateescape") for s in segments[start:]]


def _revision_and_path(request: Request) -> tuple[str, str]:
    tail = _raw_tail(request)
    return tail[0], "/".join(tail[1:])


def for_both_repo_forms(path: str, methods: tuple[str, ...] = ("GET",), **kwargs) -> Callable:
    """Register a route for repo ids `name` and `namespace/name`: `path` holds `{repo}`; the endpoint takes
    `repo_id` plus its other parameters, and gets the joined id."""
    def register(fn: Callable) -> Callable:
        signature = inspect.signature(fn)
        rest = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in signature.parameters.values()
                if p.name != "repo_id"]
        for segments in (("namespace", "name"), ("name",)):
            def endpoint(__segments=segments, **kw):
                return fn(repo_id="/".join(kw.pop(s) for s in __segments), **kw)
            params = [inspect.Parameter(s, inspect.Parameter.KEYWORD_ONLY, annotation=str) for s in segments]
            endpoint.__signature__ = signature.replace(parameters=params + rest)
            endpoint.__doc__ = fn.__doc__
            for method in methods:  # one route per method: each OpenAPI operation needs its own id
                router.add_api_route(path.replace("{repo}", "/".join("{%s}" % s for s in segments)), endpoint,
                                     methods=[method], name=f"{fn.__name__}_{len(segments)}_{method.lower()}",
                                     **need("read"), **kwargs)
        return fn
    return register


# -- listing ---------------------------------------------------------------------------------------------

@router.get("/api/models", **need("read"))
def list_models(request: Request, search: str | None = None, author: str | None = None,
                kinds: list[str] | None = Query(None, alias="filter",
                                                description="artifact kinds to keep (other values are ignored)"),
                sort: str | None = None, direction: int | None = None,
                limit: int | None = Query(None, ge=1), cursor: int = Query(0, ge=0, le=MAX_CURSOR),
                full: bool = False) -> JSONResponse:
    """Live artifacts as Hub models: `search` in the name, `author` (first segment); pages of up to 1000
    with an absolute `Link: <...>; rel="next"`."""
    page = min(limit or hfrepo.PAGE_SIZE, hfrepo.PAGE_SIZE)
    with session_for(request) as s:
        items, more = hfrepo.list_models(s, search, author, [k for k in kinds or [] if k in KINDS], sort,
                                         descending=direction != 1, offset=cursor, limit=page, full=full)
    headers = {"Link": f'<{request.url.include_query_params(cursor=cursor + page)}>; rel="next"'} if more else {}
    return JSONResponse(items, headers=headers)


# -- one repo --------------------------------------------------------------------------------------------

@for_both_repo_forms("/api/models/{repo}/refs")
def repo_refs(request: Request, repo_id: str, include_prs: bool = False) -> JSONResponse:
    """Branch main (the artifact named repo_id) and tags (`{repo_id}:{tag}`), with their commits."""
    with hub_errors(), session_for(request) as s:
        return JSONResponse(hfrepo.refs(s, repo_id))


@for_both_repo_forms("/api/models/{repo}/tree/{rest:path}")
def repo_tree(request: Request, repo_id: str, rest: str, recursive: bool = False, expand: bool = False,
              cursor: int = Query(0, ge=0, le=MAX_CURSOR)) -> JSONResponse:
    """Files (each an LFS file: `lfs.oid` is its sha256) and folders of a revision, under an optional path."""
    revision, path = _revision_and_path(request)
    with hub_errors():
        if path:
            hfrepo.check_file_path(path)
        with session_for(request) as s:
            rev = hfrepo.resolve_revision(s, repo_id, revision)
        entries = hfrepo.tree(rev, path, recursive, expand)
    page = entries[cursor:cursor + hfrepo.PAGE_SIZE]
    headers = {}
    if cursor + hfrepo.PAGE_SIZE < len(entries):
        headers["Link"] = f'<{request.url.include_query_params(cursor=cursor + hfrepo.PAGE_SIZE)}>; rel="next"'
    return JSONResponse(page, headers=headers)


@for_both_repo_forms("/api/models/{repo}/revision/{rest:path}")
def repo_info_at(request: Request, repo_id: str, rest: str) -> JSONResponse:
    """Model info at a revision (main, a tag, a commit id)."""
    return _model_info(request, repo_id, "/".join(_raw_tail(request)))


@for_both_repo_forms("/api/models/{repo}")
def repo_info(request: Request, repo_id: str) -> JSONResponse:
    """Model info of main: `sha` is the commit every file is served at, `siblings` the files."""
    return _model_info(request, repo_id, "main")


def _model_info(request: Request, repo_id: str, revision: str) -> JSONResponse:
    with hub_errors(), session_for(request) as s:
        rev = hfrepo.resolve_revision(s, repo_id, revision)
    headers = {}
    if rev.status in ("corrupt", "incomplete"):  # huggingface_hub logs X-HF-Warning; the files themselves get 409
        headers["X-HF-Warning"] = f"registry; {rev.name} is {rev.status}: its files are not served until " \
                                  f"`registry repair {rev.name}`"
    return JSONResponse(hfrepo.model_info(rev), headers=headers)


# -- the bytes ---------------------------------------------------------------------------------------------

@for_both_repo_forms("/{repo}/resolve/{rest:path}", methods=("GET", "HEAD"), response_class=Response)
def resolve_file(request: Request, repo_id: str, rest: str) -> Response:
    """A file's bytes (GET) or headers (HEAD): ETag and X-Linked-Etag are its sha256, X-Repo-Commit the commit;
    `Range: bytes=a-b | a- | -n` gives 206 with Content-Range."""
    revision, path = _revision_and_path(request)
    with hub_errors():
        hfrepo.check_repo_id(repo_id)
        hfrepo.check_revision(repo_id, revision)
        hfrepo.check_file_path(path)
        with session_for(request) as s:
            rev = hfrepo.resolve_revision(s, repo_id, revision)
            f = rev.file(path)
            blob = hfrepo.blob_row(s, f.sha256)
        handle, size = hfrepo.open_blob(request.app.state.reg.store.path(f.sha256), rev, f, blob)
    etag = f'"{f.sha256}"'
    headers = {"X-Repo-Commit": rev.commit, "ETag": etag, "X-Linked-Etag": etag, "X-Linked-Size": str(size),
               "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
    if_range = request.headers.get("if-range")
    try:
        wanted = parse_range(request.headers.get("range"), size) if if_range in (None, etag) else None
    except RangeNotSatisfiable:
        handle.close()
        asked = request.headers.get("range", "")
        asked = asked if len(asked) <= 60 else asked[:57] + "..."
        raise HFError(416, f"range {asked} is outside {path} ({size} bytes)",
                      headers={"Content-Range": f"bytes */{size}", "X-Repo-Commit": rev.commit, "ETag": etag}) from None
    start, end = wanted or (0, size)
    headers["Content-Length"] = str(end - start)
    if wanted is not None:
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    return BlobResponse(handle, start, end, 206 if wanted is not None else 200, headers,
                        send_body=request.method != "HEAD")
