"""Tokens for `registry serve` (issue 11): only a hash is stored, authenticate finds live tokens only, roles
include each other, events name who did what, and the `registry token` commands as a user runs them."""
from __future__ import annotations

import hashlib
import json
from datetime import timedelta

import numpy as np
import pytest
from safetensors.numpy import save_file
from sqlalchemy import create_engine, inspect, select, text, update

from conftest import run_cli
from registry import Registry
from registry.catalog import details, resolve, set_tag
from registry.errors import BadInput, Conflict, NotFound
from registry.models import Event, Token, utcnow
from registry.tokens import (TOKEN_ROLES, authenticate, create_token, list_tokens, mark_used, needs_touch,
                             revoke_token, role_allows)

both = pytest.mark.parametrize("home", ["sqlite", "postgresql"], indirect=True)


def _create(reg: Registry, name: str, role: str = "read") -> str:
    with reg.session() as s:
        return create_token(s, name, role)[1]


def _auth(reg: Registry, secret: str):
    with reg.read_session() as s:  # as the server does: authenticating never writes
        return authenticate(s, secret)


def _dump(reg: Registry) -> str:
    """Every row of every table as text: what a database dump or backup would hold."""
    with reg.read_session() as s:
        tables = inspect(s.connection()).get_table_names()
        return "\n".join(repr(row) for t in tables for row in s.execute(text(f'SELECT * FROM "{t}"')))


@both
def test_only_the_hash_is_stored_and_the_secret_is_nowhere_in_the_database(reg):
    with reg.session() as s:
        info, secret = create_token(s, "ci", "read")
    assert secret.startswith("rgt_") and len(secret) == 4 + 43  # 32 random bytes, url-safe base64
    assert info.prefix == secret[4:12] and info.role == "read" and info.revoked_at is None
    with reg.read_session() as s:
        row = s.scalars(select(Token)).one()
    assert row.token_hash == hashlib.sha256(secret.encode()).hexdigest() != secret
    dump = _dump(reg)
    assert secret not in dump and secret[4:] not in dump
    # The JSON form and the events say which token, never its secret or hash.
    with reg.read_session() as s:
        shown = json.dumps([t.to_dict() for t in list_tokens(s)])
    assert set(json.loads(shown)[0]) == {"name", "role", "prefix", "created_at", "last_used_at", "revoked_at"}
    with reg.read_session() as s:
        events = [(e.kind, e.detail, e.actor) for e in s.scalars(select(Event))]
    assert events == [("token-created", {"name": "ci", "role": "read"}, None)]
    assert row.token_hash not in repr(events) and row.token_hash not in shown


@both
def test_authenticate_accepts_live_tokens_only_and_touches_at_most_once_a_minute(reg):
    secret = _create(reg, "alice@laptop", "write")
    info = _auth(reg, secret)
    assert (info.name, info.role, info.last_used_at) == ("alice@laptop", "write", None) and needs_touch(info)
    for wrong in (secret + "x", secret[:-1], "rgt_", "", "Bearer " + secret, "x" * 10_000, secret.upper()):
        assert _auth(reg, wrong) is None, wrong
    with reg.session() as s:
        mark_used(s, info.id)
    first = _auth(reg, secret).last_used_at
    assert first is not None and not needs_touch(_auth(reg, secret))
    with reg.session() as s:  # a second request within the minute (or another server process) writes nothing
        mark_used(s, info.id)
    assert _auth(reg, secret).last_used_at == first
    with reg.session() as s:
        s.execute(update(Token).values(last_used_at=utcnow() - timedelta(minutes=2)))
    assert needs_touch(_auth(reg, secret))
    with reg.session() as s:
        mark_used(s, info.id)
    assert _auth(reg, secret).last_used_at >= first
    # Revoked: refused at once; the name is free again and the new token is a different secret.
    with reg.session() as s:
        assert revoke_token(s, "alice@laptop").revoked_at is not None
    assert _auth(reg, secret) is None
    again = _create(reg, "alice@laptop", "read")
    assert again != secret and _auth(reg, again).role == "read" and _auth(reg, secret) is None
    with reg.read_session() as s:
        assert [t.name for t in list_tokens(s)] == ["alice@laptop"]
        assert [(t.role, t.revoked_at is None) for t in list_tokens(s, include_revoked=True)] == [
            ("write", False), ("read", True)]


@both
def test_names_roles_duplicates_and_unknown_names_are_refused_with_the_reason(reg):
    _create(reg, "ci")
    assert _create(reg, "a" * 64)
    with reg.session() as s:
        for name in ("", "has space", "a" * 65, "-looks-like-an-option", "org/name", "tab\t", "ü"):
            with pytest.raises(BadInput, match="letters, digits"):
                create_token(s, name, "read")
        with pytest.raises(BadInput, match="not one of read, write, admin"):
            create_token(s, "x", "root")
        with pytest.raises(Conflict, match="revoke it first .* or choose another name"):
            create_token(s, "ci", "admin")
        with pytest.raises(NotFound, match="no live token named 'nobody'"):
            revoke_token(s, "nobody")


def test_roles_include_each_other():
    assert TOKEN_ROLES == ("read", "write", "admin")
    allowed = {(have, need) for have in TOKEN_ROLES for need in TOKEN_ROLES if role_allows(have, need)}
    assert allowed == {("read", "read"), ("write", "read"), ("write", "write"),
                       ("admin", "read"), ("admin", "write"), ("admin", "admin")}
    assert not role_allows("root", "read") and not role_allows("", "read")
    with pytest.raises(ValueError):
        role_allows("admin", "root")


@both
def test_events_record_the_actor_the_session_names(reg, tmp_path):
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    save_file({"w": np.zeros((2, 2), dtype=np.float32)}, str(folder / "model.safetensors"))
    from registry.importer import import_folder

    import_folder(reg, folder, "tiny")
    with reg.session() as s:
        s.info["actor"] = "token:ci"  # what the server's session_for sets
        set_tag(s, "tiny", "tiny:prod")
        create_token(s, "ops", "admin")
    with reg.read_session() as s:
        shown = details(s, resolve(s, "tiny"))["events"]
        token_events = [(e.kind, e.actor) for e in s.scalars(select(Event).where(Event.kind.like("token-%")))]
    assert [(e["kind"], e["actor"]) for e in shown] == [("registered", None), ("tagged", "token:ci")]
    assert token_events == [("token-created", "token:ci")]
    # `registry show --json` (SQLite's fast read path, or the ORM) carries the actor too.
    cli_events = json.loads(run_cli("show", "tiny", "--json").stdout)["events"]
    assert [(e["kind"], e["actor"]) for e in cli_events] == [("registered", None), ("tagged", "token:ci")]


@both
def test_token_commands_as_a_user_runs_them(reg):
    created = run_cli("token", "create", "ci", "--role", "read")
    secret = created.stdout.strip()
    assert created.stdout == secret + "\n" and secret.startswith("rgt_")  # TOKEN=$(registry token create ...)
    assert created.stderr == "created token ci (read); store it now, it is not shown again\n"
    assert _auth(reg, secret).name == "ci"
    made = json.loads(run_cli("token", "create", "ops", "--role", "admin", "--json").stdout)
    assert set(made) == {"name", "role", "prefix", "created_at", "token"} and made["token"].startswith("rgt_")
    assert made["created_at"].endswith("Z") and _auth(reg, made["token"]).role == "admin"

    listed = run_cli("token", "list", "--json").stdout
    assert [(t["name"], t["role"], t["prefix"]) for t in json.loads(listed)] == [
        ("ci", "read", secret[4:12]), ("ops", "admin", made["token"][4:12])]
    assert secret not in listed and made["token"] not in listed

    duplicate = run_cli("token", "create", "ci", "--role", "write", check=2)
    assert duplicate.stdout == "" and duplicate.stderr.splitlines() == [
        "error: a live token named 'ci' exists; revoke it first (registry token revoke ci) or choose another name"]
    assert run_cli("token", "revoke", "ci").stdout == "revoked token ci (read)\n"
    assert _auth(reg, secret) is None
    unknown = run_cli("token", "revoke", "ci", check=3)
    assert unknown.stderr.splitlines() == ["error: no live token named 'ci'; see registry token list"]

    table = run_cli("token", "list", "--all").stdout.splitlines()
    assert table[0].split() == ["NAME", "ROLE", "PREFIX", "CREATED", "LAST", "USED", "REVOKED"]
    assert table[1].split()[:3] == ["ci", "read", secret[4:12]] and "never" in table[1]
    assert table[2].split()[-1] == "-" and len(table) == 3


def test_bad_role_is_a_usage_error(home):
    proc = run_cli("token", "create", "ci", "--role", "root", check=2)
    assert proc.stdout == "" and proc.stderr.startswith("error: invalid value for '--role': 'root' is not one of")


def test_migration_0006_keeps_existing_events_and_downgrades(db_url):
    """A 0005 catalog with history upgrades (old events get no actor) and downgrades again."""
    from alembic import command

    from registry.db import alembic_config, current_revision, migrate

    engine = create_engine(db_url)
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0005")
        conn.execute(text("INSERT INTO events (at, kind, detail) VALUES (:at, 'gc', '{}')"), {"at": utcnow()})
    migrate(engine)
    assert current_revision(engine) == "0006"
    with engine.connect() as conn:
        assert conn.execute(text("SELECT kind, actor FROM events")).all() == [("gc", None)]
        assert conn.execute(text("SELECT count(*) FROM tokens")).scalar() == 0
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), "0005")
    assert "tokens" not in inspect(engine).get_table_names()
    assert "actor" not in {c["name"] for c in inspect(engine).get_columns("events")}
    with engine.connect() as conn:
        assert conn.execute(text("SELECT kind FROM events")).all() == [("gc",)]
    engine.dispose()
