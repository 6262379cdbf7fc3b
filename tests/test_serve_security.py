"""The catalog server's cross-cutting rules: the login cookie never authorizes a change (only the Authorization
header does), jobs submitted or cancelled through the API are events naming the token, and refusals carry
X-Error-Message for HF clients."""
from __future__ import annotations

import httpx
import pytest

from serving import make_token, serve_in_thread

pytestmark = pytest.mark.parametrize("home", ["sqlite", "postgresql"], indirect=True)


def test_the_login_cookie_reads_but_never_changes_anything(home):
    admin = make_token(role="admin", name="ops")
    with serve_in_thread() as url:
        cookie = {"registry_token": admin}
        assert httpx.get(f"{url}/v1/jobs", cookies=cookie).status_code == 200  # the web page's own reads
        # What a page on another origin (another port of the same host: the same "site") could send.
        forged = httpx.post(f"{url}/v1/gc", cookies=cookie, headers={"origin": "http://127.0.0.1:9999"},
                            data={"x": "1"})
        assert forged.status_code == 401 and forged.json()["error"]["code"] == "unauthorized"
        assert httpx.get(f"{url}/v1/jobs", headers={"authorization": f"Bearer {admin}"}).json() == []
        queued = httpx.post(f"{url}/v1/gc", headers={"authorization": f"Bearer {admin}"})
        assert queued.status_code == 202


def test_job_submission_and_cancel_record_the_token(home, tiny_model):
    from conftest import import_here

    import_here(tiny_model, "acme/tiny")
    writer = make_token(role="write", name="ci-bot")
    auth = {"authorization": f"Bearer {writer}"}
    with serve_in_thread() as url:
        job = httpx.post(f"{url}/v1/jobs", headers=auth, json={"type": "verify", "refs": ["acme/tiny"]}).json()
        again = httpx.post(f"{url}/v1/jobs", headers=auth, json={"type": "verify", "refs": ["acme/tiny"]}).json()
        assert again["job"] == job["job"] and again["created"] is False
        assert httpx.post(f"{url}/v1/jobs/{job['job']}/cancel", headers=auth).json()["cancelled"] is True
        events = httpx.get(f"{url}/v1/events", headers=auth).json()
    mine = [(e["kind"], e["job_id"], e["actor"]) for e in events if e["job_id"] == job["job"]]
    assert sorted(mine) == sorted([("job-submitted", job["job"], "token:ci-bot"),
                                   ("job-attached", job["job"], "token:ci-bot"),
                                   ("job-cancelled", job["job"], "token:ci-bot")])
    assert writer not in str(events)


def test_refusals_say_why_in_a_header_hf_clients_print(home):
    reader = make_token(role="read")
    with serve_in_thread() as url:
        missing = httpx.get(f"{url}/api/models/acme/tiny")
        assert missing.status_code == 401
        assert missing.headers["x-error-message"].startswith("this server needs a token")
        denied = httpx.post(f"{url}/v1/gc", headers={"authorization": f"Bearer {reader}"})
        assert denied.status_code == 403
        assert "this needs an admin token; token" in denied.headers["x-error-message"]


def test_show_names_the_token_behind_a_change_made_through_the_server(home, tiny_model):
    from conftest import import_here, run_cli

    import_here(tiny_model, "acme/tiny")
    writer = make_token(role="write", name="release-bot")
    with serve_in_thread() as url:
        moved = httpx.put(f"{url}/v1/tags/acme/tiny:prod", json={"ref": "acme/tiny"},
                          headers={"authorization": f"Bearer {writer}"})
        assert moved.status_code == 200
    out = run_cli("show", "acme/tiny").stdout
    assert [line.split("  ", 2)[-1] for line in out.splitlines() if "tagged" in line] == \
        ["tagged acme/tiny:prod  by token:release-bot"]
