"""`registry serve`: the team catalog over HTTP (registry/server/)."""
from __future__ import annotations

import errno
import os
import socket

import click

from ..errors import BadInput, OperationFailed
from . import cli
from .common import _reg, int_range


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface, e.g. in a container).")
@click.option("--port", default=8000, show_default=True, type=int_range(1, 65535), help="Port to listen on.")
@click.option("--allow-anonymous-read", is_flag=True,
              help="Browsing and downloading need no token (submitting jobs, tagging and admin still do).")
@click.option("--workers", default=1, show_default=True, type=int_range(1, 64),
              help="Server processes (each serves requests; PostgreSQL lets several share one catalog).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True, help="Server log level (access lines at info; never headers or tokens).")
@click.option("--forwarded-allow-ips", metavar="IPS", help="Trust X-Forwarded-Proto/For from these proxy "
              "addresses (comma-separated, or *), so links the server writes use the public URL.")
def serve(host: str, port: int, allow_anonymous_read: bool, workers: int, log_level: str,
          forwarded_allow_ips: str | None) -> None:
    """Serve the catalog over HTTP: a web page, the /v1 JSON API and an HF-compatible endpoint.

    Any Hugging Face client downloads from it unchanged: HF_ENDPOINT=http://HOST:PORT with HF_TOKEN set to a
    token from `registry token create`. Every route needs a token unless --allow-anonymous-read. The API is
    described at /docs and /openapi.json. Stop with Ctrl-C or SIGTERM.

    \b
    Examples:
      registry serve
      registry serve --host 0.0.0.0 --port 8000 --workers 4
      registry serve --allow-anonymous-read
      HF_ENDPOINT=http://127.0.0.1:8000 HF_TOKEN=$TOKEN hf download acme/llama-7b
    """
    try:
        import uvicorn

        from ..server import app as _  # noqa: F401  (FastAPI and Jinja2 are there too)
    except ImportError as exc:
        raise BadInput(f"registry serve needs the serve extra ({exc.name} is missing): "
                       "pip install 'registry[serve]'") from None
    reg = _reg()
    reg.init()  # migrate once here, not in every worker process at its first request
    _check_port_free(host, port)
    # The factory reads these in each server process (several with --workers).
    os.environ["REGISTRY_HOME"] = str(reg.home)
    os.environ["REGISTRY_DATABASE_URL"] = reg.settings.database_url
    os.environ["REGISTRY_SERVE_ANONYMOUS_READ"] = "1" if allow_anonymous_read else "0"
    where = "" if allow_anonymous_read else "; every request needs a token (registry token create NAME --role read)"
    click.echo(f"serving {reg.home} on http://{host}:{port} (API docs at /docs){where}", err=True)
    extra = {"forwarded_allow_ips": forwarded_allow_ips, "proxy_headers": True} if forwarded_allow_ips else {}
    config = uvicorn.Config("registry.server.app:app_from_env", factory=True, host=host, port=port,
                            workers=workers, log_level=log_level, server_header=False, **extra)
    # uvicorn's own socket has protocol 0, so asyncio leaves Nagle on and every small response waits ~40 ms for
    # the client's delayed ACK; accepted connections inherit TCP_NODELAY from the listening socket.
    sock = config.bind_socket()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        if workers > 1:
            from uvicorn.supervisors import Multiprocess

            Multiprocess(config, sockets=[sock]).run()
        else:
            config.load_app()
            server = uvicorn.Server(config)
            server.run(sockets=[sock])
            if not server.started:
                raise OperationFailed("the server did not start; the lines above say why")
    except KeyboardInterrupt:
        pass


def _check_port_free(host: str, port: int) -> None:
    """Say plainly that the port is taken (uvicorn would log it and exit 1)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise BadInput(f"port {port} on {host} is in use; stop what listens there or choose --port") from None
            raise BadInput(f"cannot listen on {host}:{port}: {exc.strerror}; check --host") from None
