"""Talking to the Hugging Face Hub (or an HF-compatible mirror) through huggingface_hub: refs, files, tokens."""
from __future__ import annotations

import contextlib
import fnmatch
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import BadInput, NotFound, OperationFailed
from .folder import check_relative_path

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
    """The token from --token-file, else HF_TOKEN, else the huggingface_hub login store."""
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise BadInput(f"cannot read token file {token_file}: {exc.strerror}") from None
        if not token:
            raise BadInput(f"token file {token_file} is empty")
        return token
    from huggingface_hub import get_token

    return os.environ.get("HF_TOKEN") or get_token()


def offline() -> bool:
    """True when HF_HUB_OFFLINE asks for no network access."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str | None = None) -> Iterator[None]:
    """Translate huggingface_hub's exceptions into one-line registry errors."""
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
        raise http_error(exc.response.status_code if exc.response is not None else None, where) from None
    except Exception as exc:
        if is_transport_error(exc):  # connection refused, DNS, timeouts
            raise OperationFailed(f"cannot reach the hub for {where}: {exc}") from None
        raise


def is_transport_error(exc: BaseException) -> bool:
    """True for network-level failures of any httpx flavour (huggingface_hub vendors its own)."""
    return isinstance(exc, OSError) or any(c.__name__ == "TransportError" for c in type(exc).__mro__)


def http_error(status: int | None, where: str) -> Exception:
    """The registry error for an HTTP error status from the hub."""
    if status == 401:
        return AccessDenied(f"the hub answered 401 for {where}: a token is needed "
                            "(set HF_TOKEN, use --token-file, or log in with `hf auth login`)")
    if status == 403:
        return AccessDenied(f"the hub answered 403 for {where}: the token lacks access to it")
    if status == 404:
        return NotFound(f"not found on the hub: {where}")
    return OperationFailed(f"the hub answered HTTP {status} for {where}; try again later")


def _api(endpoint: str, token: str | None):
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint, token=token or False, library_name="registry")


def resolve_commit(endpoint: str, repo_id: str, revision: str, token: str | None) -> str:
    """The commit a branch, tag or commit id points at now."""
    with hub_errors(repo_id, revision):
        info = _api(endpoint, token).model_info(repo_id, revision=revision)
    if not info.sha:
        raise OperationFailed(f"the hub did not say which commit {repo_id}@{revision} is")
    return info.sha


def list_files(endpoint: str, repo_id: str, commit: str, token: str | None,
               include: list[str] | None = None, exclude: list[str] | None = None) -> list[RemoteFile]:
    """Files of a commit with their sizes and expected digests, filtered by include/exclude globs."""
    from huggingface_hub.hf_api import RepoFile

    with hub_errors(repo_id, commit):
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
        if include and not any(fnmatch.fnmatch(entry.path, g) for g in include):
            continue
        if exclude and any(fnmatch.fnmatch(entry.path, g) for g in exclude):
            continue
        sha256 = entry.lfs.sha256 if entry.lfs else None
        files.append(RemoteFile(entry.path, entry.lfs.size if entry.lfs else entry.size, entry.blob_id, sha256))
    if not files:
        raise BadInput(f"{repo_id}@{commit[:12]} has no files matching --include/--exclude")
    return sorted(files, key=lambda f: f.path)


def file_url(endpoint: str, repo_id: str, commit: str, path: str) -> str:
    """The download URL of one file at a commit."""
    from huggingface_hub import hf_hub_url

    return hf_hub_url(repo_id, path, revision=commit, endpoint=endpoint)
