"""The client side of `registry serve`'s /v1 API: what the CLI uses when REGISTRY_URL names a catalog server.

Errors come back as `{"error": {"code", "message", "exit_code"}}` and are raised again as the registry.errors
class of that code, so a command exits with the same code against a server as against a local catalog.
REGISTRY_TOKEN goes only into the Authorization header: never into a message, a log line or a job.
"""
from __future__ import annotations

import os
import time
from typing import Any
from urllib.parse import quote, urlsplit

from .errors import BadInput, Conflict, Forbidden, NotFound, OperationFailed, RegistryError, Unauthorized

URL_ENV = "REGISTRY_URL"
TOKEN_ENV = "REGISTRY_TOKEN"
ALLOW_HTTP_ENV = "REGISTRY_ALLOW_HTTP_TOKEN"  # =1: send the token over plain http to another host anyway
CONNECT_TIMEOUT = 10.0  # seconds to open a connection
READ_TIMEOUT = 60.0  # seconds a request may wait for an answer (a search on a big catalog, a busy server)
POLL_SECONDS = 0.5  # how often a waiting job command asks for its job's state
POLL_OUTAGE_SECONDS = 30.0  # how long a waiting command rides out a server it cannot reach (a restart)
FINISHED = ("succeeded", "failed", "cancelled")

_ERRORS: dict[str, type[RegistryError]] = {
    "bad_input": BadInput, "conflict": Conflict, "not_found": NotFound, "failed": OperationFailed,
    "unauthorized": Unauthorized, "forbidden": Forbidden, "internal": OperationFailed,
}


def configured() -> bool:
    """True when REGISTRY_URL is set: the catalog commands then talk to that server, not a local database."""
    return bool(os.environ.get(URL_ENV, "").strip())


def base_url() -> str:
    """REGISTRY_URL without a trailing slash; bad input unless it is an http(s) URL with a host."""
    url = os.environ.get(URL_ENV, "").strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise BadInput(f"{URL_ENV} {url!r} is not a catalog server URL; use e.g. http://models.team:8000")
    return url


def ref_path(ref: str) -> str:
    """An artifact ref (name, tag, digest) as URL path segments: '/' kept (org/name), everything else escaped,
    and '.'/'..' segments escaped too so that no client or proxy folds them into another path."""
    segments = [quote(s, safe=":@") for s in ref.split("/")]
    return "/".join(s.replace(".", "%2E") if s in (".", "..") else s for s in segments)


class Client:
    """One server: its base URL, the bearer token (if any) and timeouts. Methods return the decoded JSON."""

    def __init__(self, url: str | None = None, token: str | None = None):
        import httpx

        self.url = url or base_url()
        secret = token if token is not None else os.environ.get(TOKEN_ENV, "").strip()
        self.has_token = bool(secret)
        if secret and not _token_allowed(self.url):
            raise BadInput(f"refusing to send {TOKEN_ENV} over plain http to {urlsplit(self.url).hostname}; use an "
                           f"https URL (a TLS proxy in front of registry serve), or set {ALLOW_HTTP_ENV}=1 on a "
                           "network you trust")
        headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        # No redirects: a token is sent to REGISTRY_URL and nowhere else.
        self._http = httpx.Client(base_url=self.url, headers=headers, follow_redirects=False,
                                  timeout=httpx.Timeout(READ_TIMEOUT, connect=CONNECT_TIMEOUT))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: dict | None = None) -> Any:
        return self.request("POST", path, json=body if body is not None else {})

    def put(self, path: str, body: dict) -> Any:
        return self.request("PUT", path, json=body)

    def delete(self, path: str, **params: Any) -> Any:
        return self.request("DELETE", path, params=params)

    def request(self, method: str, path: str, **kw: Any) -> Any:
        import httpx

        try:
            response = self._http.request(method, path, **kw)
        except httpx.TimeoutException:
            raise OperationFailed(f"{URL_ENV} {self.url} did not answer {method} {path.split('?')[0]} in time; "
                                  "try again later") from None
        except httpx.TransportError as exc:  # connection refused, DNS, reset
            raise OperationFailed(f"cannot reach {URL_ENV} {self.url}: {_reason(exc)}; check that "
                                  "`registry serve` runs there") from None
        if response.status_code >= 400:
            raise self.error(response)
        try:
            return response.json()
        except ValueError:
            raise OperationFailed(f"{self.url} answered {method} {path} with something other than JSON; is "
                                  f"{URL_ENV} a registry server?") from None

    def error(self, response) -> RegistryError:
        """The registry error a server's error answer stands for (a proxy's HTML page included)."""
        try:
            error = response.json()["error"]
            code, message = str(error["code"]), str(error["message"])
        except (ValueError, KeyError, TypeError):
            return OperationFailed(f"{self.url} answered HTTP {response.status_code} to {response.request.method} "
                                   f"{response.request.url.path}; is {URL_ENV} a registry server?")
        cls = _ERRORS.get(code, OperationFailed)
        if cls is Unauthorized:
            # The server's own advice speaks of HTTP headers; a CLI user sets an environment variable.
            if not self.has_token:
                message = (f"{self.url} needs a token: set {TOKEN_ENV} (its admin makes one with "
                           "`registry token create NAME --role read`)")
            else:
                message = f"{self.url} refused {TOKEN_ENV}: {message}"
        return cls(message)

    def wait_for_job(self, job_id: int, reporter=None) -> dict[str, Any]:
        """Poll a job until it finishes, showing its progress on `reporter`; returns its final job dict.

        Rides out a server that cannot be reached for a short while (a restart behind a load balancer)."""
        shown: tuple | None = None
        outage_since: float | None = None
        while True:
            try:
                job = self.get(f"/v1/jobs/{job_id}")
                outage_since = None
            except OperationFailed:
                now = time.monotonic()
                outage_since = outage_since or now
                if now - outage_since > POLL_OUTAGE_SECONDS:
                    raise
                time.sleep(POLL_SECONDS)
                continue
            if reporter is not None:
                shown = _show_progress(reporter, job, shown)
            if job["state"] in FINISHED:
                if reporter is not None:
                    reporter.finish()
                return job
            time.sleep(POLL_SECONDS)


def _token_allowed(url: str) -> bool:
    """config.safe_for_token's rule (the one hub tokens follow), or plain http the user allowed."""
    from .config import safe_for_token

    return safe_for_token(url) or os.environ.get(ALLOW_HTTP_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _show_progress(reporter, job: dict[str, Any], shown: tuple | None) -> tuple | None:
    """Move the bar to the job's progress; a new total or unit (the job's next phase) starts a new bar."""
    p = job["progress"]
    if not p.get("total"):
        return shown
    phase = (p["total"], p.get("unit") or "B")
    if phase != shown:
        reporter.start(p["total"], phase[1], f"job {job['id']}")
    reporter.advance(max(0, (p.get("done") or 0) - reporter.done))
    return phase


def _reason(exc: Exception) -> str:
    """'connection refused' rather than '[Errno 111] Connection refused'."""
    text = str(exc) or type(exc).__name__
    if "] " in text and text.startswith("["):
        text = text.split("] ", 1)[1]
    return text[:1].lower() + text[1:]
