"""Talking to the Hugging Face Hub (or an HF-compatible mirror) through huggingface_hub: refs, files, tokens."""
from __future__ import annotations

import contextlib
import fnmatch
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .config import TrustedEndpoint, WorkerConfig, normalize_endpoint, safe_for_token
from .errors import BadInput, NotFound, OperationFailed
from .folder import check_relative_path

PUBLIC_HUB = "https://huggingface.co"
REPO_ID_RE = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


class AccessDenied(OperationFailed):
    """The hub answered 401/403: a token is missing or lacks access."""


@dataclass(frozen=True)
class RemoteFile:
    """One file of a commit as the hub lists it, with the digests it promises."""

    path: str
    size: int
    git_sha1: str
    sha256: str | None  # LFS files only

    @property
    def key(self) -> str:
        """A name for this content that is known before downloading it."""
        return self.sha256 or f"git-{self.git_sha1}"


def parse_repo_ref(ref: str) -> tuple[str, str]:
    """'org/name@rev' -> ('org/name', 'rev'); the revision defaults to main."""
    repo_id, _, revision = ref.partition("@")
    if not REPO_ID_RE.match(repo_id) or ".." in repo_id or (ref.count("@") and not revision):
        raise BadInput(f"malformed repo id {ref!r}; use org/name or org/name@revision")
    return repo_id, revision or "main"


def endpoint_url(endpoint: str | None = None) -> str:
    """--endpoint, else HF_ENDPOINT, else the public hub."""
    from huggingface_hub import constants

    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def read_token(token_file: str | None = None) -> str | None:
    """The token from a token file, else HF_TOKEN, else the huggingface_hub login store."""
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise BadInput(f"cannot read token file {token_file}: {exc.strerror}") from None
        if not token:
            raise BadInput(f"token file {token_file} is empty")
        return token
    return ambient_token()


def ambient_token() -> str | None:
    """HF_TOKEN, else the huggingface_hub login store: for the public hub and this process's HF_ENDPOINT."""
    from huggingface_hub import get_token

    return os.environ.get("HF_TOKEN") or get_token()


# Endpoints the user of this process named on the command line, with the token they gave (None: the
# ambient HF_TOKEN / login store). Filled by the CLI before it runs a job in-process; never stored anywhere,
# so a job that another process picks up (`registry worker`, `--detach`) only gets that worker's configuration.
_session_trust: dict[str, str | None] = {}


class UntrustedEndpoint(BadInput):
    """A job names an endpoint this worker's configuration does not trust."""


def trust_for_session(endpoint: str, token: str | None) -> None:
    """Trust `endpoint` for jobs run in this process, with `token` (None: HF_TOKEN or the login store)."""
    _session_trust[normalize_endpoint(endpoint)] = token


def token_for(config: WorkerConfig, endpoint: str, refuse_untrusted: bool = True) -> str | None:
    """The token this process may send to `endpoint`, by the worker's rules, never by a job's parameters.

    In order: the token the user of this process gave for it on the command line (trust_for_session); its
    `[[endpoints]]` entry in the configuration (token_file or token_env, else no token); HF_TOKEN or the
    login store for the public hub, this process's own HF_ENDPOINT, and an endpoint named on the command
    line without a token. Any other endpoint is refused (UntrustedEndpoint, exit 2) or, with
    refuse_untrusted=False, gets no token. No token goes over plain http to a host other than loopback
    unless its entry says allow_http_token = true.
    """
    key = normalize_endpoint(endpoint)
    entry = config.endpoint(endpoint)
    allow_http = bool(entry and entry.allow_http_token)
    if _session_trust.get(key):
        explicit = token = _session_trust[key]
    elif entry is not None:
        explicit = token = _configured_token(entry, config)
    elif key in _session_trust or key in _ambient_endpoints():
        explicit, token = None, ambient_token()
    elif refuse_untrusted:
        raise UntrustedEndpoint(
            f"endpoint {endpoint} is not trusted by this worker; to allow it, add [[endpoints]] "
            f"url = \"{endpoint}\" (with token_file = \"...\" if it needs a token) to {config.path}")
    else:
        return None
    if token and not allow_http and not safe_for_token(endpoint):
        if explicit:
            raise BadInput(f"refusing to send a token over plain http to {endpoint}; use https, or set "
                           f"allow_http_token = true for it in {config.path}")
        return None  # the ambient hub token is simply not sent there
    return token


def is_trusted(config: WorkerConfig, endpoint: str) -> bool:
    """True when token_for would not refuse this endpoint."""
    key = normalize_endpoint(endpoint)
    return key in _session_trust or config.endpoint(endpoint) is not None or key in _ambient_endpoints()


def _ambient_endpoints() -> set[str]:
    from huggingface_hub import constants

    env = os.environ.get("HF_ENDPOINT")
    # constants.ENDPOINT is HF_ENDPOINT when that was set at import; the public hub is always trusted.
    return {normalize_endpoint(constants.ENDPOINT), normalize_endpoint(PUBLIC_HUB)} | (
        {normalize_endpoint(env)} if env else set())


def _configured_token(entry: TrustedEndpoint, config: WorkerConfig) -> str | None:
    if entry.token_env:
        token = os.environ.get(entry.token_env, "").strip()
        if not token:
            raise BadInput(f"{config.path}: the token for {entry.url} comes from ${entry.token_env}, which is "
                           "not set in this worker's environment")
        return token
    return read_token(entry.token_file) if entry.token_file else None


def offline() -> bool:
    """True when HF_HUB_OFFLINE asks for no network access."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str | None = None, endpoint: str | None = None,
               token_sent: bool = False) -> Iterator[None]:
    """Translate huggingface_hub's exceptions into one-line registry errors (naming `endpoint` unless it is
    the public hub, and telling a missing token from a refused one)."""
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    where = f"{repo_id}@{revision}" if revision else repo_id
    try:
        yield
    except GatedRepoError:
        raise AccessDenied(f"{repo_id} is gated: the token lacks access; accept its terms on the hub "
                           "or use a token that has access") from None
    except RevisionNotFoundError:
        raise NotFound(f"revision not found: {where}; check the branch, tag or commit") from None
    except RepositoryNotFoundError:
        raise NotFound(f"repo not found: {repo_id} (if it is private, give a token with HF_TOKEN "
                       "or --token-file)") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        raise http_error(status, where, endpoint, token_sent, server_message(exc.response)) from None
    except Exception as exc:
        if is_transport_error(exc):  # connection refused, DNS, timeouts
            raise OperationFailed(f"cannot reach the hub for {where}: {exc}") from None
        raise


def is_transport_error(exc: BaseException) -> bool:
    """True for network-level failures of any httpx flavour (huggingface_hub vendors its own)."""
    return isinstance(exc, OSError) or any(c.__name__ == "TransportError" for c in type(exc).__mro__)


def http_error(status: int | None, where: str, endpoint: str | None = None, token_sent: bool = False,
               said: str | None = None) -> Exception:
    """The registry error for an HTTP error status from the hub (or the mirror or registry at `endpoint`);
    `said`: the server's own one-line reason, when it gave one."""
    public = endpoint is None or normalize_endpoint(endpoint) == normalize_endpoint(PUBLIC_HUB)
    who = "the hub" if public else endpoint
    reason = f" (it says: {said})" if said else ""
    if status == 401 and token_sent:
        return AccessDenied(f"{who} answered 401 for {where}: it does not accept the token (unknown, expired or "
                            f"revoked){reason}")
    if status == 401:
        return AccessDenied(f"{who} answered 401 for {where}: a token is needed "
                            "(set HF_TOKEN, use --token-file, or log in with `hf auth login`)")
    if status == 403:
        return AccessDenied(f"{who} answered 403 for {where}: the token lacks access to it{reason}")
    if status == 404:
        return NotFound(f"not found on {who}: {where}")
    return OperationFailed(f"{who} answered HTTP {status} for {where}; try again later")


def server_message(response) -> str | None:
    """The one-line reason an error response gives: the Hub's X-Error-Message header, else a JSON body's
    error (a string, or the {"error": {"message"}} of `registry serve`'s /v1 shape); at most 200 characters."""
    if response is None:
        return None
    said = response.headers.get("X-Error-Message")
    if not said:
        try:
            error = response.json().get("error")
        except Exception:  # not JSON, or a streamed body not read
            return None
        said = error.get("message") if isinstance(error, dict) else error
    if not isinstance(said, str) or not said.strip():
        return None
    line = " ".join(said.split())
    return line if len(line) <= 200 else line[:197] + "..."


def _api(endpoint: str, token: str | None):
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint, token=token or False, library_name="registry")


def resolve_commit(endpoint: str, repo_id: str, revision: str, token: str | None) -> str:
    """The commit a branch, tag or commit id points at now."""
    with hub_errors(repo_id, revision, endpoint, bool(token)):
        info = _api(endpoint, token).model_info(repo_id, revision=revision)
    if not info.sha:
        raise OperationFailed(f"the hub did not say which commit {repo_id}@{revision} is")
    return info.sha


def list_files(endpoint: str, repo_id: str, commit: str, token: str | None,
               include: list[str] | None = None, exclude: list[str] | None = None) -> list[RemoteFile]:
    """Files of a commit with their sizes and expected digests, filtered by include/exclude globs."""
    from huggingface_hub.hf_api import RepoFile

    with hub_errors(repo_id, commit, endpoint, bool(token)):
        entries = list(_api(endpoint, token).list_repo_tree(repo_id, revision=commit, recursive=True))
    files = []
    for entry in entries:
        if not isinstance(entry, RepoFile):
            continue
        try:
            check_relative_path(entry.path)
        except BadInput:
            raise BadInput(f"{repo_id}@{commit[:12]} lists an unsafe file name {entry.path!r}; "
                           "refusing the whole pull") from None
        sha256 = entry.lfs.sha256 if entry.lfs else None
        files.append(RemoteFile(entry.path, entry.lfs.size if entry.lfs else entry.size, entry.blob_id, sha256))
    if not files:  # nothing to pull or compare: never register an empty artifact
        raise BadInput(f"{repo_id}@{commit[:12]} has no files")
    if include or exclude:
        files = select_files(files, include, exclude, f"{repo_id}@{commit[:12]}")
    return sorted(files, key=lambda f: f.path)


def selects(path: str, include: list[str] | None, exclude: list[str] | None) -> bool:
    """Whether the --include/--exclude globs keep this file."""
    return (not include or any(fnmatch.fnmatch(path, g) for g in include)) and not (
        exclude and any(fnmatch.fnmatch(path, g) for g in exclude))


def select_files(files: list[RemoteFile], include: list[str] | None, exclude: list[str] | None,
                 where: str) -> list[RemoteFile]:
    """The files the globs keep; none is bad input."""
    kept = [f for f in files if selects(f.path, include, exclude)]
    if not kept:
        raise BadInput(f"{where} has no files matching --include/--exclude")
    return kept


def file_url(endpoint: str, repo_id: str, commit: str, path: str) -> str:
    """The download URL of one file at a commit."""
    from huggingface_hub import hf_hub_url

    return hf_hub_url(repo_id, path, revision=commit, endpoint=endpoint)
