"""The catalog's web pages: server-rendered Jinja2 templates and a little plain JavaScript (static/app.js).

Pages: the catalog (`/`, search and kind filter), an artifact (`/models/{ref}`: files, metadata, evaluation,
lineage graph, tags, events, jobs, an HF_ENDPOINT snippet), the jobs (`/jobs`, progress bars that app.js keeps
current by polling GET /v1/jobs), and the token login (`/login`, `/logout`). Every page needs a read token (or
anonymous reading); without one `need(..., page=True)` answers 401 with the login form (login_response).
Templates autoescape everything; the lineage graph is laid out here and drawn as inline SVG by the template.
"""
from __future__ import annotations

import json
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader

from .. import catalog
from .. import jobs as joblib
from ..errors import BadInput, NotFound
from ..render import human_size
from ..schema import KINDS, MAX_ID
from ..search import lineage_graph, search_artifacts
from .auth import COOKIE, need, session_for

router = APIRouter()

HERE = Path(__file__).parent
PAGE_SIZE = 50
MAX_OFFSET = MAX_ID  # an SQL OFFSET: bounded so that the database can take it
OFFSET_RE = re.compile(r"^[0-9]{1,10}$")
COOKIE_MAX_AGE = 30 * 24 * 3600  # the token itself stays valid until revoked; this only spares logging in daily
MAX_LOGIN_BODY = 16 * 1024
# Scripts only from /static (no inline script, so an injected <script> would not run even if escaping failed);
# inline style attributes are allowed for the progress bars' widths.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


def _model_url(name: str) -> str:
    return "/models/" + urllib.parse.quote(name, safe="/:@+")


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)


def _compact(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str, separators=(", ", ": "))


def _when(iso: str | None) -> str:
    """'2026-11-29T07:13:23.123456Z' -> '2026-11-29 07:13:23'."""
    return iso[:19].replace("T", " ") if iso else "-"


ENV = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True, trim_blocks=True,
                  lstrip_blocks=True)
ENV.filters.update(size=human_size, model_url=_model_url, pretty=_pretty, compact=_compact, when=_when)
# metadata lists like architectures read best inline; nested configs go in a collapsed <pre>
ENV.tests["scalar_list"] = lambda v: isinstance(v, list) and all(isinstance(x, (str, int, float)) for x in v)


def render(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    """A page: the template with the caller (for the header) and whether this server allows anonymous reading."""
    caller = getattr(request.state, "caller", None)
    html = ENV.get_template(template).render(request=request, caller=caller,
                                            anonymous=request.app.state.anonymous, **context)
    return HTMLResponse(html, status_code=status_code, headers=SECURITY_HEADERS)


def login_response(request: Request, message: str | None = None, status_code: int = 401,
                   next_path: str | None = None) -> HTMLResponse:
    """The login form; app.py answers a page asked for without a valid token with it (401); logging in returns
    to the page asked for."""
    if next_path is None:
        next_path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return render(request, "login.html", status_code, message=message, next_path=_local_path(next_path))


def _error_page(request: Request, exc: Exception, status_code: int) -> HTMLResponse:
    return render(request, "error.html", status_code, message=str(exc), status=status_code)


# -- the catalog ------------------------------------------------------------------------------------------------

@router.get("/", response_class=HTMLResponse, **need("read", page=True))
def catalog_page(request: Request, q: str = "", kind: str = "",
                 offset: str = Query("0", description=f"the first row shown: 0 to {MAX_OFFSET}")) -> HTMLResponse:
    # offset is parsed here rather than by FastAPI so that a bad one gets this HTML error page, not JSON
    q, kind, offset = q.strip()[:200], kind.strip(), offset.strip() or "0"
    if kind and kind not in KINDS:
        return _error_page(request, BadInput(f"unknown kind {kind!r}; use one of: {', '.join(KINDS)}"), 422)
    if not OFFSET_RE.match(offset) or int(offset) > MAX_OFFSET:
        return _error_page(request, BadInput(f"offset must be a whole number from 0 to {MAX_OFFSET}"), 422)
    offset = int(offset)
    with session_for(request) as s:
        items, total = search_artifacts(s, q=q or None, kind=kind or None, limit=PAGE_SIZE, offset=offset)
    pages = {"prev": _catalog_url(q, kind, max(offset - PAGE_SIZE, 0)) if offset > 0 else None,
             "next": _catalog_url(q, kind, offset + PAGE_SIZE) if offset + PAGE_SIZE < total else None}
    kinds = [(k, _catalog_url(q, k, 0)) for k in ("", *KINDS)]
    return render(request, "catalog.html", active="catalog", items=items, total=total, q=q, kind=kind,
                  kinds=kinds, offset=offset, pages=pages)


def _catalog_url(q: str, kind: str, offset: int) -> str:
    params = {k: v for k, v in (("q", q), ("kind", kind), ("offset", offset)) if v}
    return "/" + (f"?{urllib.parse.urlencode(params)}" if params else "")


# -- one artifact -----------------------------------------------------------------------------------------------

@router.get("/models/{ref:path}", response_class=HTMLResponse, **need("read", page=True))
def artifact_page(request: Request, ref: str) -> HTMLResponse:
    try:
        with session_for(request) as s:
            artifact = catalog.resolve(s, ref)
            d = catalog.details(s, artifact)
            graph = layout_lineage(lineage_graph(s, artifact), artifact.id)
    except NotFound as exc:
        return _error_page(request, exc, 404)
    except BadInput as exc:
        return _error_page(request, exc, 422)
    provenance = d.get("provenance") or {}
    gguf = _gguf(d)
    return render(request, "artifact.html", a=d, graph=graph, evaluation=provenance.get("evaluation"),
                  quantization=provenance.get("quantization"), gguf=gguf, snippet=_snippet(request, d, gguf))


def _gguf(d: dict[str, Any]) -> dict[str, Any] | None:
    """A GGUF artifact's facts (meta["gguf"]), its file and the file's download URL: the HF resolve route at the
    artifact's own commit, so the link always gives these bytes (the login cookie authorizes it)."""
    if d["kind"] != "gguf":
        return None
    meta = (d.get("metadata") or {}).get("gguf") or {}
    from ..gguf.options import chosen_gguf

    file = chosen_gguf(meta, [f["path"] for f in d["file_list"]])
    if file is None:  # several GGUF files (a Hub repo pulled whole): the file list has each one
        return None
    url = "/" + urllib.parse.quote(d["name"], safe="/") + "/resolve/" + d["digest"][7:47] + "/" + \
        urllib.parse.quote(file, safe="/")
    return {"meta": meta, "file": file, "url": url,
            "size": next(f["size"] for f in d["file_list"] if f["path"] == file)}


def _snippet(request: Request, d: dict[str, Any], gguf: dict[str, Any] | None = None) -> str:
    """What to paste into a shell to load this artifact through this server's HF-compatible endpoint."""
    base_url = str(request.base_url).rstrip("/")
    repo = d["name"]
    if gguf is not None:  # llama.cpp and Ollama take the one file (Ollama reads the chat template from it)
        from ..gguf.ollama import modelfile
        from ..gguf.options import file_stem

        folder = file_stem(repo).lower()
        try:  # the Modelfile `registry export --ollama` writes: its TEMPLATE and stop strings matter to Ollama
            ollama = f"cat > {folder}/Modelfile <<'EOF'\n{modelfile(gguf['meta'], gguf['file'])}EOF\n"
        except BadInput:  # a chat template that does not render: Ollama reads the GGUF's own
            ollama = f"echo 'FROM ./{gguf['file']}' > {folder}/Modelfile\n"
        return (f"HF_ENDPOINT={base_url} hf download {repo} {gguf['file']} --local-dir {folder}\n"
                f"llama-cli -m {folder}/{gguf['file']} -cnv\n"
                f"{ollama}ollama create {folder} -f {folder}/Modelfile")
    if d["kind"] in ("adapter", "gguf"):  # a LoRA adapter alone is not a causal LM; several GGUFs: fetch the files
        code = f"from huggingface_hub import snapshot_download; print(snapshot_download('{repo}'))"
    else:
        code = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('{repo}')"
    return f'HF_ENDPOINT={base_url} python -c "{code}"'


# -- the lineage graph ------------------------------------------------------------------------------------------

NODE_W, NODE_H, COL_GAP, ROW_GAP, PAD, LANE, LABEL_CHARS = 208, 52, 56, 18, 12, 14, 23


@dataclass
class GraphNode:
    id: int
    name: str
    kind: str
    status: str
    x: int
    y: int
    current: bool

    @property
    def label(self) -> str:
        """The name as fits the box (about 23 characters of 13 px bold text): long names lose their middle, which
        keeps the organisation and the suffix (-merged, -gptq-int4) that tell relatives apart."""
        if len(self.name) <= LABEL_CHARS:
            return self.name
        return self.name[:10] + "\u2026" + self.name[-(LABEL_CHARS - 11):]


@dataclass
class GraphEdge:
    path: str
    role: str
    label_x: int
    label_y: int
    title: str


@dataclass
class Graph:
    nodes: list[GraphNode]
    edges: list[GraphEdge]
    width: int
    height: int
    node_w: int = NODE_W
    node_h: int = NODE_H


def layout_lineage(graph: dict[str, list[dict[str, Any]]], current_id: int) -> Graph:
    """Place lineage nodes in columns by generation, left to right (base -> adapter -> merged -> quantized):
    a node's column is its longest path from a root. Edges between neighbouring columns are curves from the
    parent's right side to the child's left; an edge skipping columns (a merged model's base) arcs over the
    top in its own lane so it never crosses a box."""
    nodes = {n["id"]: n for n in graph["nodes"]}
    edges = [e for e in graph["edges"] if e["parent"] in nodes and e["child"] in nodes]
    column = {i: 0 for i in nodes}
    for _ in range(len(nodes)):  # longest path by relaxation; link() refuses cycles, the bound guards anyway
        changed = False
        for e in edges:
            if column[e["child"]] < column[e["parent"]] + 1:
                column[e["child"]], changed = column[e["parent"]] + 1, True
        if not changed:
            break
    columns: dict[int, list[int]] = {}
    for i in sorted(nodes):
        columns.setdefault(column[i], []).append(i)
    long_edges = [e for e in edges if column[e["child"]] - column[e["parent"]] > 1]
    top = PAD + LANE * len(long_edges) + (12 if long_edges else 0)
    placed: dict[int, GraphNode] = {}
    for col, ids in columns.items():
        for row, i in enumerate(ids):
            n = nodes[i]
            placed[i] = GraphNode(i, n["name"], n["kind"], n["status"], PAD + col * (NODE_W + COL_GAP),
                                  top + row * (NODE_H + ROW_GAP), i == current_id)
    drawn = []
    for e in edges:
        p, c = placed[e["parent"]], placed[e["child"]]
        title = f"{c.name} has {p.name} as its {e['role']}"
        if e in long_edges:
            lane = PAD + 8 + LANE * long_edges.index(e)
            x1, x2 = p.x + NODE_W // 2, c.x + NODE_W // 2
            path = f"M{x1},{p.y} C{x1},{lane} {x2},{lane} {x2},{c.y - 2}"
            apex = (p.y + 3 * lane) // 4  # the curve's highest point: its label sits just above
            drawn.append(GraphEdge(path, e["role"], (x1 + x2) // 2, apex - 3, title))
        else:
            x1, y1, x2, y2 = p.x + NODE_W, p.y + NODE_H // 2, c.x - 2, c.y + NODE_H // 2
            mid = (x1 + x2) // 2
            path = f"M{x1},{y1} C{mid},{y1} {mid},{y2} {x2},{y2}"
            drawn.append(GraphEdge(path, e["role"], mid, (y1 + y2) // 2 - 4, title))
    rows = max((len(ids) for ids in columns.values()), default=1)
    width = 2 * PAD + len(columns) * NODE_W + (len(columns) - 1) * COL_GAP
    return Graph(list(placed.values()), drawn, width, top + rows * (NODE_H + ROW_GAP) - ROW_GAP + PAD)


# -- jobs -------------------------------------------------------------------------------------------------------

@router.get("/jobs", response_class=HTMLResponse, **need("read", page=True))
def jobs_page(request: Request) -> HTMLResponse:
    with session_for(request) as s:
        items = [joblib.job_dict(j) for j in joblib.list_jobs(s, limit=PAGE_SIZE)]
    return render(request, "jobs.html", active="jobs", jobs=items, limit=PAGE_SIZE)


# -- login ------------------------------------------------------------------------------------------------------

def _local_path(next_path: str | None) -> str:
    """`next` only ever leads to a page of this server: a path, never `//host` or `http://...`."""
    if not next_path or not next_path.startswith("/") or next_path.startswith(("//", "/\\")):
        return "/"
    parts = urllib.parse.urlsplit(next_path)
    if parts.scheme or parts.netloc or any(ch < " " for ch in next_path) or parts.path in ("/login", "/logout"):
        return "/"
    return next_path


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str = "/") -> HTMLResponse:
    return login_response(request, None, 200, next)


@router.post("/login", response_class=HTMLResponse)
async def login_submit(request: Request) -> Response:
    """Form-urlencoded `token` (and `next`): a valid token becomes the HttpOnly login cookie."""
    body = await request.body()
    if len(body) > MAX_LOGIN_BODY:
        return login_response(request, "the form is too large", 413, "/")
    form = urllib.parse.parse_qs(body.decode("utf-8", "replace"), max_num_fields=10)
    secret = (form.get("token") or [""])[0].strip()
    next_path = _local_path((form.get("next") or ["/"])[0])
    if not secret:
        return login_response(request, "paste a token (create one with: registry token create NAME --role read)",
                          422, next_path)
    info = await run_in_threadpool(_authenticate, request, secret)
    if info is None:
        return login_response(request, "unknown or revoked token", 401, next_path)
    response = RedirectResponse(next_path, status_code=303)
    response.set_cookie(COOKIE, secret, max_age=COOKIE_MAX_AGE, path="/", httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")
    return response


def _authenticate(request: Request, secret: str):
    from .. import tokens

    with request.app.state.reg.read_session() as s:
        return tokens.authenticate(s, secret)


@router.get("/logout")
def logout(request: Request) -> Response:
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict",
                           secure=request.url.scheme == "https")
    return response
