"""Where the registry keeps its data (REGISTRY_HOME, REGISTRY_DATABASE_URL), and the worker configuration."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import platformdirs

from .errors import BadInput


@dataclass(frozen=True)
class Settings:
    """Resolved locations of the home folder and the catalog database."""

    home: Path
    database_url: str
    busy_timeout_ms: int = 30_000

    @property
    def blobs_dir(self) -> Path:
        return self.home / "blobs" / "sha256"

    @property
    def tmp_dir(self) -> Path:
        return self.home / "tmp"

    @property
    def snapshots_dir(self) -> Path:
        return self.home / "snapshots"


def default_home() -> Path:
    """The per-user data folder used when REGISTRY_HOME is not set."""
    return Path(platformdirs.user_data_dir("registry", appauthor=False))


def load_settings(home: str | os.PathLike | None = None, database_url: str | None = None) -> Settings:
    """Settings from arguments, then the environment, then defaults."""
    home_path = Path(home or os.environ.get("REGISTRY_HOME") or default_home()).expanduser().absolute()
    url = database_url or os.environ.get("REGISTRY_DATABASE_URL") or f"sqlite:///{home_path / 'registry.db'}"
    busy_ms = int(float(os.environ.get("REGISTRY_BUSY_TIMEOUT", "30")) * 1000)
    return Settings(home=home_path, database_url=url, busy_timeout_ms=busy_ms)


# --- The worker's own configuration: which endpoints may get which token, which host paths jobs may read ---
# Job parameters come from anyone who can queue a job, so nothing secret (a token, a token file) and no
# trust decision may come from them: both live here, in a file only the worker's owner writes.

@dataclass(frozen=True)
class TrustedEndpoint:
    """A hub or mirror this worker may talk to, and where its token comes from (none: anonymous)."""

    url: str
    token_file: str | None = None
    token_env: str | None = None
    allow_http_token: bool = False


@dataclass(frozen=True)
class WorkerConfig:
    """Trusted endpoints and allowed roots, from `REGISTRY_CONFIG` or `<home>/config.toml`."""

    path: Path
    endpoints: tuple[TrustedEndpoint, ...] = ()
    allowed_roots: tuple[Path, ...] | None = None  # None: any path (the single-user default)

    def endpoint(self, url: str) -> TrustedEndpoint | None:
        """The entry for this endpoint URL, if the configuration trusts it."""
        wanted = normalize_endpoint(url)
        return next((e for e in self.endpoints if normalize_endpoint(e.url) == wanted), None)

    def check_path(self, path: str | os.PathLike, what: str) -> Path:
        """The path with symlinks resolved; refused (exit 2) when it is outside every allowed root."""
        resolved = Path(path).expanduser().resolve()
        if self.allowed_roots is None or any(resolved.is_relative_to(root) for root in self.allowed_roots):
            return resolved
        shown = str(path) if str(resolved) == str(path) else f"{path} (resolves to {resolved})"
        roots = ", ".join(str(r) for r in self.allowed_roots)
        raise BadInput(f"{what} {shown} is outside this worker's allowed roots ({roots}); move it under one of "
                       f"them, or add a root to [paths] allowed_roots in {self.path}")


def normalize_endpoint(url: str) -> str:
    """One spelling per endpoint: no trailing slash, lower-case scheme and host."""
    parts = urlsplit(url.strip())
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), parts.path.rstrip("/"), parts.query,
                       parts.fragment))


def safe_for_token(url: str) -> bool:
    """Whether a token may go to this URL: https, or plain http to this machine (loopback: the traffic never
    leaves it). Hub tokens (hub.token_for) and REGISTRY_TOKEN (remote.py) follow this one rule."""
    import ipaddress

    parts = urlsplit(url)
    if parts.scheme == "https" or parts.hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(parts.hostname or "").is_loopback
    except ValueError:
        return False


def worker_config_path(home: Path) -> Path:
    """`REGISTRY_CONFIG`, else `<home>/config.toml`."""
    return Path(os.environ.get("REGISTRY_CONFIG") or home / "config.toml").expanduser().absolute()


def load_worker_config(home: Path) -> WorkerConfig:
    """Read and validate the worker configuration; a missing file means the single-user defaults."""
    path = worker_config_path(home)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if os.environ.get("REGISTRY_CONFIG"):
            raise BadInput(f"REGISTRY_CONFIG names {path}, which does not exist") from None
        return WorkerConfig(path)
    except OSError as exc:
        raise BadInput(f"cannot read the configuration {path}: {exc.strerror}") from None
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BadInput(f"{path} is not valid TOML: {exc}") from None
    return _parse_worker_config(path, data)


def _parse_worker_config(path: Path, data: dict) -> WorkerConfig:
    def bad(key: str, what: str) -> BadInput:
        return BadInput(f"{path}: {key} {what}")

    _no_unknown_keys(path, "", data, {"endpoints", "paths"})
    endpoints = []
    entries = data.get("endpoints", [])
    if not isinstance(entries, list):
        raise bad("endpoints", "must be a list of [[endpoints]] tables")
    for n, entry in enumerate(entries):
        key = f"endpoints[{n}]"
        if not isinstance(entry, dict):
            raise bad(key, "must be a table with url = \"https://...\"")
        _no_unknown_keys(path, key + ".", entry, {"url", "token_file", "token_env", "allow_http_token"})
        url = entry.get("url")
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise bad(f"{key}.url", "must be an http:// or https:// URL with a host, e.g. \"https://mirror.internal\"")
        token_file, token_env = entry.get("token_file"), entry.get("token_env")
        if token_file is not None and (not isinstance(token_file, str) or not os.path.isabs(token_file)):
            raise bad(f"{key}.token_file", "must be an absolute path")
        if token_env is not None and (not isinstance(token_env, str) or not token_env):
            raise bad(f"{key}.token_env", "must be the name of an environment variable")
        if token_file is not None and token_env is not None:
            raise bad(key, "may have token_file or token_env, not both")
        allow_http = entry.get("allow_http_token", False)
        if not isinstance(allow_http, bool):
            raise bad(f"{key}.allow_http_token", "must be true or false")
        endpoints.append(TrustedEndpoint(url.rstrip("/"), token_file, token_env, allow_http))
    paths = data.get("paths", {})
    if not isinstance(paths, dict):
        raise bad("paths", "must be a [paths] table")
    _no_unknown_keys(path, "paths.", paths, {"allowed_roots"})
    roots = paths.get("allowed_roots")
    if roots is not None:
        if not isinstance(roots, list) or not all(isinstance(r, str) and os.path.isabs(r) for r in roots):
            raise bad("paths.allowed_roots", "must be a list of absolute paths, e.g. [\"/data/models\"]")
        roots = tuple(Path(r).resolve() for r in roots)
    return WorkerConfig(path, tuple(endpoints), roots)


def _no_unknown_keys(path: Path, prefix: str, table: dict, known: set[str]) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise BadInput(f"{path}: unknown key {prefix}{unknown[0]}; known keys here: {', '.join(sorted(known))}")
