"""`registry serve`: the team model catalog over HTTP (the /v1 API, a web page and an HF-compatible endpoint).

Needs the `serve` extra (FastAPI, uvicorn, Jinja2), never torch.
"""
from __future__ import annotations


def create_app(reg, allow_anonymous_read: bool = False):
    """The FastAPI application serving this Registry (see app.py)."""
    from .app import create_app as _create

    return _create(reg, allow_anonymous_read)
