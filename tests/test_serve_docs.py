"""/docs browses the API with Swagger UI served by the registry itself: no CDN (a team network may be offline, and
a third-party script would run on the logged-in origin), and the page keeps the web pages' Content-Security-Policy
(scripts from this origin only), so Swagger UI is started from a static file rather than an inline script.
"""
from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from serving import make_token, serve_in_thread

CHROMIUM = "/usr/bin/chromium"

pytestmark = pytest.mark.parametrize("home", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture
def served(home):
    from registry import Registry

    reg = Registry()
    reg.init()
    with serve_in_thread(reg) as url:
        yield url, make_token(reg, "read")


def test_docs_page_loads_only_this_servers_scripts(served):
    url, token = served
    assert httpx.get(url + "/docs").status_code == 401  # the login page, not the API description
    r = httpx.get(url + "/docs", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert "<script>" not in r.text  # no inline script: the CSP would block it
    scripts = re.findall(r'<script src="([^"]+)"', r.text)
    styles = re.findall(r'<link rel="(?:stylesheet|icon)"[^>]* href="([^"]+)"', r.text)
    assert scripts and all(src.startswith("/") and "http" not in src for src in scripts + styles), scripts + styles
    for path in scripts + styles:  # public like the rest of /static: no token sent
        asset = httpx.get(url + path)
        assert asset.status_code == 200 and len(asset.content) > 100, path
        assert asset.headers["content-type"].split(";")[0] in ("text/javascript", "text/css", "image/png"), path
    assert httpx.get(url + "/static/swagger-ui/redoc.standalone.js").status_code == 404  # only what /docs uses
    assert httpx.get(url + "/static/swagger-ui/..%2F__init__.py").status_code == 404


def test_docs_page_shows_the_operations_in_a_browser(served, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (make test-deps installs it)")
    from playwright.sync_api import sync_playwright

    url, token = served
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run"])
        try:
            context = browser.new_context()
            context.add_cookies([{"name": "registry_token", "value": token, "url": url}])  # as /login sets it
            page = context.new_page()
            problems: list[str] = []
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            offsite: list[str] = []
            page.on("request", lambda r: offsite.append(r.url) if not r.url.startswith(url) else None)
            assert page.goto(url + "/docs").status == 200
            page.wait_for_selector(".opblock-summary-path", timeout=8000)  # the operations are drawn
            text = page.inner_text("#swagger-ui")
            assert "Unable to render" not in text
            for operation in ("/v1/artifacts", "/v1/jobs", "/v1/tokens", "/api/models"):
                assert operation in text, operation
            page.screenshot(path=str(tmp_path / "docs.png"))
            assert problems == [] and offsite == [], (problems, offsite)  # no CSP violation, nothing off-site
        finally:
            browser.close()


def test_the_schema_declares_the_bearer_token_on_every_guarded_operation(home):
    token = make_token(role="read")
    with serve_in_thread() as url:
        schema = httpx.get(f"{url}/openapi.json", headers={"authorization": f"Bearer {token}"}).json()
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    guarded = [(path, method) for path, ops in schema["paths"].items() for method, op in ops.items()
               if "x-registry-role" in op]
    assert len(guarded) > 20
    assert all(schema["paths"][p][m]["security"] == [{"bearer": []}] for p, m in guarded)
    assert "security" not in schema["paths"]["/v1/health"]["get"]
