"""Job requests as library calls: the params and dedup key of a pull, verify, merge, quantize, convert or repair
job.

The CLI (which runs the job or queues it with --detach) and the server's POST /v1/jobs both build their jobs
here, so the same request from either makes the same params and dedup key and attaches to the same job.
Each function refuses what the catalog can refuse at once (a bad ref, a name that is a tag, a corrupt input,
an untrusted endpoint), so no doomed job is queued. Nothing here imports torch.

Options that name a path on this host (quantize's calibration file, repair's source folder) are keyword-only:
the CLI passes them, the server never does (a remote client cannot name files on the server).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from . import quantize_options
from .errors import BadInput, OperationFailed, RegistryError
from .schema import KINDS

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from .core import Registry
    from .models import Job

log = logging.getLogger("registry.submit")

# What a quantize request may ask for (registry.quantize imports torch; these come from its torch-free part).
QUANTIZE_BITS = quantize_options.BITS
QUANTIZE_DEVICES = quantize_options.DEVICES


@dataclass(frozen=True)
class JobRequest:
    """What to queue: a job type, its params (JSON) and the dedup key that makes identical requests one job."""

    type: str
    params: dict[str, Any]
    dedup_key: str

    def enqueue(self, session: Session) -> tuple[Job, bool]:
        """Queue it in `session` (or find the identical unfinished job): (job, created)."""
        from . import jobs

        return jobs.enqueue(session, self.type, self.params, self.dedup_key)


def pull_request(reg: Registry, repo: str, include: Iterable[str] = (), exclude: Iterable[str] = (),
                 endpoint: str | None = None, name: str | None = None, kind: str | None = None, workers: int = 8,
                 tags: Iterable[str] = (), for_remote: bool = False) -> JobRequest:
    """A pull of REPO_ID[@REVISION]: resolves the revision to a commit now (one request to the endpoint), so the
    job downloads exactly that commit, and checks the names and tags the result would get.

    `endpoint` (default: HF_ENDPOINT, else the public hub) must be one this host trusts (hub.token_for: the
    public hub, HF_ENDPOINT, the worker config's [[endpoints]], or one the CLI user named on the command line
    via hub.trust_for_session): anything else is UntrustedEndpoint (bad input). The token stays out of params.
    `for_remote`: the caller is a client of `registry serve` (POST /v1/jobs), not this host's user; the errors
    about this host's configuration then say what is wrong without its file paths or the admin's fix.
    """
    from . import catalog, hub
    from .pull import check_pull

    repo_id, revision = hub.parse_repo_ref(repo)
    include, exclude, tags = list(include), list(exclude), list(tags)
    for t in tags:  # syntax only, before any request; clashes with names are checked once the commit is known
        catalog.check_name(t, "tag")
    if kind is not None and kind not in KINDS:
        raise BadInput(f"unknown kind {kind!r}; use one of: {', '.join(KINDS)}")
    if not 1 <= workers <= 64:
        raise BadInput(f"workers {workers} is out of range; use 1 to 64 parallel downloads")
    url = hub.endpoint_url(endpoint)
    token = _endpoint_token(reg, url, for_remote)
    commit = hub.resolve_commit(url, repo_id, revision, token)
    check_pull(reg, repo_id, revision, commit, name, include, exclude, tags)  # queue no doomed job
    # No token and no token file in params: anyone who can queue a job can read (and write) them.
    params = {"repo_id": repo_id, "revision": revision, "commit": commit, "endpoint": url,
              "include": sorted(include), "exclude": sorted(exclude), "name": name, "kind": kind,
              "workers": workers, "tags": sorted(set(tags))}
    # The revision and tags are in the key: a pull that attached to another's job would not get its own tags.
    key = "pull:" + "|".join(str(params[k]) for k in ("endpoint", "repo_id", "commit", "include", "exclude",
                                                       "name", "kind", "revision", "tags"))
    return JobRequest("pull", params, key)


def _endpoint_token(reg: Registry, url: str, for_remote: bool) -> str | None:
    """hub.token_for by this host's worker configuration; for a server's client, its errors without host paths
    (the full one goes to the server's log, where the admin who can fix it looks)."""
    from . import hub
    from .config import load_worker_config

    try:
        return hub.token_for(load_worker_config(reg.home), url)
    except hub.UntrustedEndpoint:
        if not for_remote:
            raise
        raise hub.UntrustedEndpoint(f"endpoint {url} is not trusted by this server (its workers' config.toml has no "
                                    "[[endpoints]] entry for it); ask the server's admin") from None
    except RegistryError as exc:  # a trusted endpoint whose token the configuration cannot supply
        if not for_remote:
            raise
        log.warning("pull from %s refused: %s", url, exc)
        raise OperationFailed(f"this server's configuration for endpoint {url} is incomplete (its log says why); "
                              "ask the server's admin") from None


def verify_params(ids: list[int], all_: bool, quick: bool) -> tuple[dict, str]:
    """A verify job's params and dedup key for resolved artifact ids (fastread's quick verify builds its own
    finished job with these)."""
    key = f"verify:{'all' if all_ else ','.join(map(str, ids))}:{quick}"
    return {"artifact_ids": ids, "all": all_, "quick": quick}, key


def verify_request(reg: Registry, refs: Iterable[str] = (), all_: bool = False, quick: bool = False) -> JobRequest:
    """Re-hash the named artifacts (or all of them). Refs are resolved now: the job names artifacts by id, not
    by a tag or digest prefix that may move."""
    from . import catalog

    refs = list(refs)
    if not refs and not all_:
        raise BadInput("name at least one artifact to verify, or pass --all")
    with reg.read_session() as s:
        ids = sorted({catalog.resolve(s, r).id for r in refs})
    return JobRequest("verify", *verify_params(ids, all_, quick))


def merge_request(reg: Registry, base: str, adapter: str, name: str | None = None, dtype: str = "auto",
                  check: bool = False, force: bool = False, allow_pickle: bool = False) -> JobRequest:
    """Fuse ADAPTER into BASE. Everything the catalog alone decides (refs, kinds, the adapter's base, the
    result's name, the dtype) is refused now, without importing torch (merge.check_request)."""
    from .merge import check_request

    with reg.read_session() as s:
        base_a, adapter_a, _ = check_request(s, base, adapter, name, dtype, force)
        base_id, adapter_id = base_a.id, adapter_a.id
    params = {"base_id": base_id, "adapter_id": adapter_id, "name": name, "dtype": dtype, "check": check,
              "force": force, "allow_pickle": allow_pickle}
    return JobRequest("merge", params, "merge:" + "|".join(str(params[k]) for k in sorted(params)))


def quantize_request(reg: Registry, ref: str, bits: int = 4, group_size: int = 128, desc_act: bool = False,
                     sym: bool = True, samples: int | None = None, seq_len: int = 512, seed: int = 0,
                     device: str = "auto", evaluate: bool = True, max_ppl_ratio: float = 1.5,
                     name: str | None = None, *, calibration: str | None = None) -> JobRequest:
    """GPTQ-quantize REF. `calibration` (a file on this host) is for the CLI only. Options the worker would
    refuse without looking at the weights are refused now; a group size that does not divide the layers is
    found by the job (it reads the safetensors headers)."""
    from . import catalog

    opts = quantize_options.QuantizeOptions(
        bits=bits, group_size=group_size, desc_act=desc_act, sym=sym, samples=samples, seq_len=seq_len,
        device=device, seed=seed, evaluate=evaluate, max_ppl_ratio=max_ppl_ratio,
        calibration=calibration and str(Path(calibration).absolute()))
    quantize_options.check_options(opts)
    with reg.read_session() as s:
        source = catalog.require_usable(catalog.resolve(s, ref))
        quantize_options.check_quantizable(source)
        source_id = source.id
        catalog.check_new_name(s, name or catalog.quantized_name(source.name, bits))  # queue no doomed job
    params = {"source_id": source_id, "name": name, "options": dataclasses.asdict(opts)}
    return JobRequest("quantize", params, "quantize:" + json.dumps(params, sort_keys=True))


def convert_request(reg: Registry, ref: str, to: str = "gguf", outtype: str = "f16", pre_tokenizer: str | None = None,
                    evaluate: bool = True, max_ppl_ratio: float = 1.5, allow_tokenizer_mismatch: bool = False,
                    name: str | None = None) -> JobRequest:
    """Convert REF to a GGUF file. What needs no weights is refused now, without torch or llama.cpp: options, the
    source's kind and status, the result's name, the architecture and the tokenizer case (registry.gguf)."""
    from .gguf.convert import check_source
    from .gguf.options import ConvertOptions
    from .gguf.tokenizer import plan_tokenizer

    if to != "gguf":
        raise BadInput(f"unknown --to {to!r}; registry convert makes gguf files")
    opts = ConvertOptions(outtype=outtype, pre_tokenizer=pre_tokenizer, evaluate=evaluate,
                          max_ppl_ratio=max_ppl_ratio, allow_tokenizer_mismatch=allow_tokenizer_mismatch)
    source = check_source(reg, ref, opts, name)
    plan_tokenizer(source.files, pre_tokenizer)  # queue no doomed job: a missing tokenizer.model, no tokenizer
    params = {"source_id": source.id, "to": to, "name": name, "options": dataclasses.asdict(opts)}
    return JobRequest("convert", params, "convert:" + json.dumps(params, sort_keys=True))


def repair_request(reg: Registry, ref: str, *, from_dir: str | None = None) -> JobRequest:
    """Restore REF's damaged files from its source, or (CLI only) from `from_dir`, a folder on this host."""
    from .repair import resolve_for_repair

    params: dict[str, Any] = {}
    if from_dir is not None:
        folder = Path(from_dir).expanduser()
        if not folder.is_dir():
            raise BadInput(f"--from {from_dir}: {'not a folder' if folder.exists() else 'no such folder'}; give "
                           "the folder that holds the artifact's files")
        params["from_dir"] = str(folder.resolve())  # the job may run in a worker with another working folder
    with reg.read_session() as s:  # resolve now: the job names the artifact by id, never by a movable ref
        artifact = resolve_for_repair(s, ref)
        params.update({"artifact_id": artifact.id, "name": artifact.name})
    key = f"repair:{artifact.id}" + (f":from:{params['from_dir']}" if from_dir is not None else "")
    return JobRequest("repair", params, key)
