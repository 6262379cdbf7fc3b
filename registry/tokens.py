"""API tokens for `registry serve`: create, list, revoke, authenticate, and what each role may do.

A token's secret is "rgt_" + 32 random bytes (url-safe base64). It is shown once, when it is created; the
catalog keeps only its sha256, so a copy of the database (a backup, a dump) lets nobody in. Because the secret
is random and long, a plain sha256 is enough (no slow password hash): authenticating is one indexed lookup of
the hash, the same work for every request whatever it sends.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .catalog import record_event
from .errors import BadInput, Conflict, NotFound
from .models import Token, utcnow
from .schema import TOKEN_ROLES

SECRET_PREFIX = "rgt_"  # marks a registry token in a config file or a leaked log, as "hf_" does for the hub
PREFIX_CHARS = 8  # how much of the secret (after "rgt_") `token list` shows, to tell tokens apart
MAX_SECRET_LENGTH = 256  # longer is no token of ours: refused without hashing a megabyte header
TOUCH_EVERY = timedelta(seconds=60)  # last_used_at is kept to the minute: no write per request
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


@dataclass
class TokenInfo:
    """What the catalog knows about a token: never its secret or hash."""

    id: int
    name: str
    role: str
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None

    @classmethod
    def of(cls, token: Token) -> TokenInfo:
        return cls(token.id, token.name, token.role, token.prefix, token.created_at, token.last_used_at,
                   token.revoked_at)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (`token list --json`, GET /v1/tokens): times in ISO 8601 UTC with Z."""
        data = dataclasses.asdict(self)
        del data["id"]  # a row number, meaningless to users; tokens are named
        for key in ("created_at", "last_used_at", "revoked_at"):
            data[key] = data[key] and data[key].isoformat() + "Z"
        return data


def hash_secret(secret: str) -> str:
    """The stored form of a secret: sha256 hex of its UTF-8 bytes."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def check_name(name: str) -> str:
    """A token name people type and events show: letters, digits, '.', '_', '-', '@'; at most 64 characters."""
    if not NAME_RE.match(name):
        raise BadInput(f"token name {name!r} is not allowed: use 1 to 64 letters, digits, '.', '_', '-' or '@', "
                       "starting with a letter or digit (e.g. ci, alice@laptop)")
    return name


def check_role(role: str) -> str:
    if role not in TOKEN_ROLES:
        raise BadInput(f"token role {role!r} is not one of {', '.join(TOKEN_ROLES)}")
    return role


def create_token(session: Session, name: str, role: str) -> tuple[TokenInfo, str]:
    """Make a token; returns its info and the secret, which nothing stores: the caller shows it once."""
    check_name(name)
    check_role(role)
    if _live(session, name) is not None:
        raise _taken(name)
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    token = Token(name=name, role=role, token_hash=hash_secret(secret),
                  prefix=secret[len(SECRET_PREFIX):len(SECRET_PREFIX) + PREFIX_CHARS], created_at=utcnow())
    session.add(token)
    try:
        session.flush()
    except IntegrityError:  # another process created a live token of this name since we looked
        raise _taken(name) from None
    record_event(session, "token-created", name=name, role=role)
    return TokenInfo.of(token), secret


def list_tokens(session: Session, include_revoked: bool = False) -> list[TokenInfo]:
    """Live tokens (and revoked ones too when asked), oldest first."""
    query = select(Token).order_by(Token.created_at, Token.id)
    if not include_revoked:
        query = query.where(Token.revoked_at.is_(None))
    return [TokenInfo.of(t) for t in session.scalars(query)]


def revoke_token(session: Session, name: str) -> TokenInfo:
    """Revoke the live token of this name at once: its next request is refused (401). The row stays, so
    events that name it still say who it was."""
    token = _live(session, name)
    if token is None:
        raise NotFound(f"no live token named {name!r}; see registry token list")
    token.revoked_at = utcnow()
    session.flush()
    record_event(session, "token-revoked", name=token.name, role=token.role)
    return TokenInfo.of(token)


def authenticate(session: Session, secret: str) -> TokenInfo | None:
    """The live token whose secret this is, or None (unknown, revoked, or not a token at all).

    Reads only (the server calls it in a read-only session); `mark_used` records the use when
    `last_used_at` is older than TOUCH_EVERY."""
    if not isinstance(secret, str) or not secret or len(secret) > MAX_SECRET_LENGTH:
        return None
    token = session.scalars(select(Token).where(Token.token_hash == hash_secret(secret),
                                                Token.revoked_at.is_(None))).first()
    return TokenInfo.of(token) if token is not None else None


def needs_touch(info: TokenInfo, now: datetime | None = None) -> bool:
    """Whether a request by this token should update its last_used_at (at most once a minute)."""
    return info.last_used_at is None or (now or utcnow()) - info.last_used_at >= TOUCH_EVERY


def mark_used(session: Session, token_id: int) -> None:
    """Set last_used_at to now, unless another request (or server process) already did within the minute."""
    now = utcnow()
    session.execute(update(Token).where(Token.id == token_id, or_(Token.last_used_at.is_(None),
                                                                  Token.last_used_at <= now - TOUCH_EVERY))
                    .values(last_used_at=now).execution_options(synchronize_session=False))


def role_allows(have: str, need: str) -> bool:
    """Whether a token of role `have` may do what needs `need`: admin includes write, write includes read."""
    if need not in TOKEN_ROLES:
        raise ValueError(f"unknown role {need!r}")
    return have in TOKEN_ROLES and TOKEN_ROLES.index(have) >= TOKEN_ROLES.index(need)


def _live(session: Session, name: str) -> Token | None:
    return session.scalars(select(Token).where(Token.name == name, Token.revoked_at.is_(None))).first()


def _taken(name: str) -> Conflict:
    return Conflict(f"a live token named {name!r} exists; revoke it first (registry token revoke {name}) "
                    "or choose another name")
