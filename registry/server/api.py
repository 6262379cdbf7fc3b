"""The registry's own JSON API under /v1: artifacts, lineage, manifests, tags, events, jobs, gc and tokens.

Each route declares the role it needs with `need()` (auth.py); errors are registry.errors exceptions, which the
app turns into the one JSON error shape. Answers have the shapes the CLI's --json prints, so the CLI against a
server (REGISTRY_URL, registry/remote.py) shows what it would show locally. Jobs are submitted by artifact refs
and options only: a field that names a path on the server's host does not exist here (submit.py takes those as
CLI-only keywords), and the request models forbid unknown fields.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from fastapi import APIRouter, Body, Depends, Path, Query, Request
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError
from sqlalchemy import select

from .. import catalog, jobs, search, submit, tokens
from ..gguf.options import OUTTYPES
from ..models import Artifact, Event, Tag
from ..schema import JOB_STATES, KINDS, MAX_ID, SCHEMA_HEAD, TOKEN_ROLES
from .auth import Caller, current_caller, need, session_for

router = APIRouter()

# Fields a client might send that would name files on the server's host; refused by name, with the reason.
HOST_PATH_FIELDS = ("calibration", "from_dir", "from", "folder", "token_file", "cache_dir", "path")


def _plain_text(value: str) -> str:
    """A string the catalog can store and compare on both backends: PostgreSQL refuses NUL characters, and
    UTF-8 has no unpaired surrogates."""
    if "\x00" in value:
        raise PydanticCustomError("text", "must not contain a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise PydanticCustomError("text", "must be valid Unicode text (no unpaired surrogates)") from None
    return value


Text = Annotated[str, Field(max_length=1024), AfterValidator(_plain_text)]
Ref = Annotated[Text, Path(description="An artifact name, a tag, or a `sha256:` digest prefix (8+ hex digits)")]
JobId = Annotated[int, Path(ge=1, le=MAX_ID)]


def _reg(request: Request):
    return request.app.state.reg


# -- service --------------------------------------------------------------------------------------------------

@router.get("/v1/health", tags=["service"])
def health(request: Request) -> dict[str, Any]:
    """Whether the server and its catalog answer (public: for load balancers and compose health checks)."""
    with _reg(request).read_session() as s:
        s.execute(select(1))
    return {"ok": True, "schema": SCHEMA_HEAD}


@router.get("/v1/whoami", tags=["service"], **need("read"))
def whoami(caller: Caller = Depends(current_caller)) -> dict[str, Any]:
    """The token this request was made with and its role (null token: anonymous read)."""
    return {"token": caller.token, "role": caller.role}


# -- artifacts ------------------------------------------------------------------------------------------------

@router.get("/v1/artifacts", tags=["artifacts"], **need("read"))
def list_artifacts(request: Request,
                   q: Annotated[Text | None, Query(description="Case-insensitive substring of the name")] = None,
                   kind: Annotated[Literal[KINDS] | None, Query()] = None,  # type: ignore[valid-type]
                   base: Annotated[Text | None, Query(description="Only artifacts derived from this ref")] = None,
                   meta: Annotated[list[Text], Query(description="KEY=VALUE metadata filter (repeatable); "
                                                     "nested keys dotted: quantization_config.bits=4")] = [],
                   deleted: Annotated[bool, Query(description="Include removed artifacts")] = False,
                   limit: Annotated[int, Query(ge=1, le=search.MAX_LIMIT)] = 50,
                   offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0) -> dict[str, Any]:
    """Search the catalog, newest first: `{items: [summary as list --json], total, limit, offset}`."""
    filters = search.parse_meta_filters(meta)
    with session_for(request) as s:
        items, total = search.search_artifacts(s, q, kind, base, filters, deleted, limit, offset)
    return {"items": items, "total": total, "limit": limit, "offset": offset}


# Routes with a suffix come before the bare {ref:path} ones, which would take "x/lineage" as a ref.
@router.get("/v1/artifacts/{ref:path}/lineage", tags=["artifacts"], **need("read"))
def artifact_lineage(ref: Ref, request: Request) -> dict[str, Any]:
    """The artifact with all its ancestors and descendants: `{nodes: [...], edges: [{parent, child, role}]}`."""
    with session_for(request) as s:
        return search.lineage_graph(s, catalog.resolve(s, ref))


@router.get("/v1/artifacts/{ref:path}/manifest", tags=["artifacts"], **need("read"))
def artifact_manifest(ref: Ref, request: Request) -> dict[str, Any]:
    """The canonical manifest (its SHA-256 is the digest), with metadata and provenance (= manifest --json)."""
    with session_for(request) as s:
        artifact = catalog.resolve(s, ref)
        return {"digest": artifact.digest, "manifest": catalog.artifact_manifest(artifact),
                "metadata": artifact.meta, "provenance": artifact.provenance}


@router.get("/v1/artifacts/{ref:path}", tags=["artifacts"], **need("read"))
def show_artifact(ref: Ref, request: Request) -> dict[str, Any]:
    """Everything `registry show --json` prints: summary, metadata, provenance, files, lineage, jobs, events."""
    with session_for(request) as s:
        return catalog.details(s, catalog.resolve(s, ref))


@router.delete("/v1/artifacts/{ref:path}", tags=["artifacts"], **need("admin"))
def remove_artifact(ref: Ref, request: Request,
                    force: Annotated[bool, Query(description="Even though others derive from it")] = False):
    """Remove an artifact from the catalog (= registry rm); its blobs are freed by gc. 409 while artifacts
    derive from it, unless force."""
    with session_for(request, write=True) as s:
        tags = catalog.tags_of(s, catalog.resolve(s, ref).id)
        artifact = catalog.remove_artifact(s, ref, force)
        return {"name": artifact.name, "digest": artifact.digest, "tags": tags}


# -- tags and events ------------------------------------------------------------------------------------------

@router.get("/v1/tags", tags=["tags"], **need("read"))
def list_tags(request: Request) -> list[dict[str, Any]]:
    """Every tag and the artifact it points at, by tag name."""
    with session_for(request) as s:
        rows = s.execute(select(Tag.name, Tag.updated_at, Artifact.name, Artifact.digest)
                         .join(Artifact, Artifact.id == Tag.artifact_id).order_by(Tag.name)).all()
    return [{"tag": tag, "name": name, "digest": digest, "updated_at": updated.isoformat() + "Z"}
            for tag, updated, name, digest in rows]


class TagBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ref: Text = Field(description="The artifact to point the tag at: a name, tag or digest prefix")


@router.put("/v1/tags/{tag:path}", tags=["tags"], **need("write"))
def put_tag(tag: Annotated[Text, Path()], body: TagBody, request: Request) -> dict[str, Any]:
    """Point TAG at an artifact, moving it if it exists (= registry tag)."""
    with session_for(request, write=True) as s:
        artifact, previous = catalog.set_tag(s, body.ref, tag)
        return {"tag": tag, "name": artifact.name, "digest": artifact.digest, "previous": previous}


@router.get("/v1/events", tags=["events"], **need("read"))
def list_events(request: Request, artifact: Annotated[Text | None, Query(description="Only this artifact's")] = None,
                limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[dict[str, Any]]:
    """The event log, newest first; `actor` says which token did it through the server (null: on a host)."""
    with session_for(request) as s:
        query = (select(Event, Artifact.name).outerjoin(Artifact, Artifact.id == Event.artifact_id)
                 .order_by(Event.id.desc()).limit(limit))
        if artifact is not None:
            query = query.where(Event.artifact_id == catalog.resolve(s, artifact).id)
        rows = s.execute(query).all()
        return [{"id": e.id, "at": e.at.isoformat() + "Z", "kind": e.kind, "artifact": name, "job_id": e.job_id,
                 "actor": e.actor, "detail": e.detail} for e, name in rows]


# -- jobs -----------------------------------------------------------------------------------------------------

@router.get("/v1/jobs", tags=["jobs"], **need("read"))
def list_jobs(request: Request,
              state: Annotated[Literal[JOB_STATES] | None, Query()] = None,  # type: ignore[valid-type]
              limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> list[dict[str, Any]]:
    """Jobs, newest first (= registry jobs --json)."""
    with session_for(request) as s:
        return [jobs.job_dict(j) for j in jobs.list_jobs(s, state, limit)]


@router.get("/v1/jobs/{job_id}", tags=["jobs"], **need("read"))
def show_job(job_id: JobId, request: Request) -> dict[str, Any]:
    """One job with its live progress, result or error (= registry job --json)."""
    with session_for(request) as s:
        return jobs.job_dict(jobs.get(s, job_id))


class _JobBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _no_host_paths(cls, data: Any) -> Any:
        named = sorted(set(data) & set(HOST_PATH_FIELDS)) if isinstance(data, dict) else []
        if named:
            raise PydanticCustomError("host_path", "{field} would name a path on the server's host; the API takes "
                                      "artifact refs and options only (run that command on the host instead)",
                                      {"field": named[0]})
        return data


class PullJob(_JobBody):
    type: Literal["pull"]
    repo: Text = Field(description="REPO_ID[@REVISION] on the endpoint")
    include: list[Text] = Field([], max_length=256)
    exclude: list[Text] = Field([], max_length=256)
    name: Text | None = None
    kind: Literal[KINDS] | None = None  # type: ignore[valid-type]
    tags: list[Text] = Field([], max_length=64)
    endpoint: Text | None = Field(None, description="Default: the server's HF_ENDPOINT; else one its worker "
                                  "config.toml trusts ([[endpoints]])")


class VerifyJob(_JobBody):
    type: Literal["verify"]
    refs: list[Text] = Field([], max_length=1000)
    all: bool = False
    quick: bool = False


class MergeJob(_JobBody):
    type: Literal["merge"]
    base: Text
    adapter: Text
    name: Text | None = None
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    check: bool = False
    force: bool = False


class QuantizeJob(_JobBody):
    type: Literal["quantize"]
    ref: Text
    bits: Literal[submit.QUANTIZE_BITS] = 4  # type: ignore[valid-type]
    group_size: int = Field(128, ge=-1, le=2**31)
    desc_act: bool = False
    sym: bool = True
    samples: int | None = Field(None, ge=1, le=2**31)
    seq_len: int = Field(512, ge=8, le=2**31)
    seed: int = Field(0, ge=0, le=2**32 - 1)
    device: Literal[submit.QUANTIZE_DEVICES] = "auto"  # type: ignore[valid-type]
    evaluate: bool = True
    max_ppl_ratio: float = Field(1.5, gt=0, le=1e6)
    name: Text | None = None


class ConvertJob(_JobBody):
    type: Literal["convert"]
    ref: Text
    to: Literal["gguf"] = "gguf"
    outtype: Literal[OUTTYPES] = "f16"  # type: ignore[valid-type]
    # One of gguf.options.PRE_TOKENIZERS, checked by submit.convert_request: its message names the close ones,
    # where a Literal of 84 names would list them all.
    pre_tokenizer: Text | None = Field(None, description="a pre-tokenizer name llama.cpp knows, e.g. gpt-2, qwen2")
    evaluate: bool = True
    max_ppl_ratio: float = Field(1.5, gt=0, le=1e6)
    allow_tokenizer_mismatch: bool = False
    name: Text | None = None


class RepairJob(_JobBody):
    type: Literal["repair"]
    ref: Text


JobBody = Annotated[Union[PullJob, VerifyJob, MergeJob, QuantizeJob, ConvertJob, RepairJob],
                    Field(discriminator="type")]


def job_request(reg, body: BaseModel) -> submit.JobRequest:
    """The submit.py request for a job body: the same params and dedup key the CLI makes."""
    if isinstance(body, PullJob):
        return submit.pull_request(reg, body.repo, body.include, body.exclude, body.endpoint, body.name, body.kind,
                                   tags=body.tags, for_remote=True)
    if isinstance(body, VerifyJob):
        return submit.verify_request(reg, body.refs, body.all, body.quick)
    if isinstance(body, MergeJob):
        return submit.merge_request(reg, body.base, body.adapter, body.name, body.dtype, body.check, body.force)
    if isinstance(body, QuantizeJob):
        return submit.quantize_request(reg, body.ref, body.bits, body.group_size, body.desc_act, body.sym,
                                       body.samples, body.seq_len, body.seed, body.device, body.evaluate,
                                       body.max_ppl_ratio, body.name)
    if isinstance(body, ConvertJob):
        return submit.convert_request(reg, body.ref, body.to, body.outtype, body.pre_tokenizer, body.evaluate,
                                      body.max_ppl_ratio, body.allow_tokenizer_mismatch, body.name)
    return submit.repair_request(reg, body.ref)


@router.post("/v1/jobs", tags=["jobs"], status_code=202, **need("write"))
def submit_job(body: Annotated[JobBody, Body()], request: Request) -> dict[str, Any]:
    """Queue a pull, verify, merge, quantize, convert or repair job for the workers; an identical unfinished job is
    returned instead (created: false). What the catalog can refuse at once (unknown refs, bad options, a
    name that is a tag, an untrusted endpoint) is refused here: 404, 409 or 422 with the reason."""
    req = job_request(_reg(request), body)
    with session_for(request, write=True) as s:
        job, created = req.enqueue(s)
        # Who asked for it: the event carries the caller's token name (events.actor), never the token.
        catalog.record_event(s, "job-submitted" if created else "job-attached", job_id=job.id, type=job.type)
        return {"job": job.id, "state": job.state, "type": job.type, "created": created}


@router.post("/v1/jobs/{job_id}/cancel", tags=["jobs"], **need("write"))
def cancel_job(job_id: JobId, request: Request) -> dict[str, Any]:
    """Cancel a queued job, or ask a running one to stop (= registry cancel --json): cancelled is false for a
    job that had already finished."""
    with session_for(request, write=True) as s:
        before = jobs.get(s, job_id).state
        job = jobs.cancel(s, job_id)
        if before in ("queued", "running"):
            catalog.record_event(s, "job-cancelled", job_id=job_id, type=job.type, state_before=before)
        return {"job": job_id, "state": job.state, "cancelled": before in ("queued", "running")}


@router.post("/v1/gc", tags=["jobs"], status_code=202, **need("admin"))
def queue_gc(request: Request) -> dict[str, Any]:
    """Queue garbage collection (blobs no artifact references, stale temporary files and snapshots) for a
    worker; while one is queued or running, that one is returned."""
    with session_for(request, write=True) as s:
        job, created = jobs.enqueue(s, "gc", {"dry_run": False, "by": "api"}, "gc:api")
        catalog.record_event(s, "job-submitted" if created else "job-attached", job_id=job.id, type=job.type)
        return {"job": job.id, "state": job.state, "type": job.type, "created": created}


# -- tokens ---------------------------------------------------------------------------------------------------

class TokenBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Text = Field(description="1 to 64 letters, digits, '.', '_', '-' or '@'")
    role: Literal[TOKEN_ROLES]  # type: ignore[valid-type]


@router.get("/v1/tokens", tags=["tokens"], **need("admin"))
def list_tokens(request: Request, all: Annotated[bool, Query(description="Include revoked tokens")] = False):
    """Tokens (never their secrets), oldest first (= registry token list --json)."""
    with session_for(request) as s:
        return [t.to_dict() for t in tokens.list_tokens(s, include_revoked=all)]


@router.post("/v1/tokens", tags=["tokens"], status_code=201, **need("admin"))
def create_token(body: TokenBody, request: Request) -> dict[str, Any]:
    """Make a token; its secret is in this answer only (`token`), the catalog keeps its hash."""
    with session_for(request, write=True) as s:
        info, secret = tokens.create_token(s, body.name, body.role)
        return {"token": secret, **info.to_dict()}


@router.delete("/v1/tokens/{name}", tags=["tokens"], **need("admin"))
def revoke_token(name: Annotated[Text, Path()], request: Request) -> dict[str, Any]:
    """Revoke the live token of this name at once (= registry token revoke --json)."""
    with session_for(request, write=True) as s:
        return tokens.revoke_token(s, name).to_dict()
