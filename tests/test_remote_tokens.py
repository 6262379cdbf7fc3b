"""`registry token create|list|revoke` with REGISTRY_URL set manage the server's tokens through /v1/tokens (an
admin token), print what they print locally, and never touch a catalog on the laptop.

The real `registry` process runs against a server in a thread of the test process (tests/serving.py).
"""
from __future__ import annotations

import json
import os
import subprocess

import httpx
import pytest

from conftest import REGISTRY_BIN
from serving import make_token, serve_in_thread

pytestmark = pytest.mark.parametrize("home", ["sqlite", "postgresql"], indirect=True)


def test_token_commands_go_to_the_server(home, tmp_path):
    from registry import Registry
    from registry.tokens import list_tokens

    reg = Registry()
    reg.init()
    laptop = tmp_path / "laptop"
    with serve_in_thread(reg) as url:
        admin = make_token(reg, "admin", "ops")
        # the laptop: REGISTRY_URL and a token, a REGISTRY_HOME that does not exist, no database URL
        laptop_env = {k: v for k, v in os.environ.items() if k != "REGISTRY_DATABASE_URL"}
        laptop_env.update(REGISTRY_URL=url, REGISTRY_TOKEN=admin, REGISTRY_HOME=str(laptop))

        def registry(*args: str, check: int = 0, token: str | None = None) -> subprocess.CompletedProcess:
            env = {**laptop_env, "REGISTRY_TOKEN": token or admin}
            proc = subprocess.run([REGISTRY_BIN, *args], capture_output=True, text=True, env=env)
            assert proc.returncode == check, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
            return proc

        made = registry("token", "create", "ci", "--role", "read")
        secret = made.stdout.strip().splitlines()[-1]
        assert secret.startswith("rgt_") and made.stdout == secret + "\n"
        assert made.stderr == "created token ci (read); store it now, it is not shown again\n"
        # the new token is the server's: it authenticates there
        who = httpx.get(f"{url}/v1/whoami", headers={"Authorization": f"Bearer {secret}"})
        assert who.status_code == 200 and who.json() == {"token": "ci", "role": "read"}

        as_json = json.loads(registry("token", "create", "bot", "--role", "write", "--json").stdout)
        assert sorted(as_json) == ["created_at", "name", "prefix", "role", "token"] and as_json["role"] == "write"

        table = registry("token", "list").stdout.splitlines()
        assert table[0].split() == ["NAME", "ROLE", "PREFIX", "CREATED", "LAST", "USED"]
        assert [line.split()[:3] for line in table[1:]] == [["ops", "admin", admin[4:12]],
                                                         ["ci", "read", secret[4:12]],
                                                         ["bot", "write", as_json["prefix"]]]

        assert registry("token", "revoke", "ci").stdout == "revoked token ci (read)\n"
        who = httpx.get(f"{url}/v1/whoami", headers={"Authorization": f"Bearer {secret}"})
        assert who.status_code == 401
        listed = json.loads(registry("token", "list", "--all", "--json").stdout)
        assert [(t["name"], t["revoked_at"] is not None) for t in listed] == \
            [("ops", False), ("ci", True), ("bot", False)]
        with reg.read_session() as s:  # what the server's catalog holds
            assert [t.name for t in list_tokens(s)] == ["ops", "bot"]

        # a token without the admin role: refused by the server, exit 4, one line
        read = make_token(reg, "read", "viewer")
        for args in (["token", "list"], ["token", "create", "x", "--role", "admin"], ["token", "revoke", "bot"]):
            proc = registry(*args, check=4, token=read)
            assert proc.stdout == "" and proc.stderr == \
                "error: this needs an admin token; token 'viewer' has the read role\n", args
        proc = registry("token", "revoke", "nobody", check=3)
        assert proc.stderr.startswith("error: ") and len(proc.stderr.splitlines()) == 1
    assert not laptop.exists()  # no registry.db (or anything else) on the laptop
