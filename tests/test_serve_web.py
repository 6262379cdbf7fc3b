"""The catalog's web page in a real browser: headless Debian Chromium driven by Playwright, against a real uvicorn.

One browser for the module. The main scenario (a base, an adapter trained on it, their merge and its int4
quantization, a running job) is built once with library calls on SQLite; the catalog queries behind the pages
run on both backends in test_serve_api.py, and one smoke test here runs the pages on PostgreSQL. The
quantization's evaluation is recorded in provenance exactly as registry/quantize.py writes it (a real GPTQ
run takes minutes). Screenshots go to $REGISTRY_TEST_ARTIFACTS (default: test-artifacts/screenshots in the checkout, ignored by git,
so a CI run leaves them in its workspace).
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from registry import Registry
from registry.importer import import_folder
from serving import make_token, serve_in_thread

playwright_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip("Debian's chromium is not installed (make test-deps installs it)", allow_module_level=True)

EVALUATION = {"perplexity_source": 12.3456, "perplexity_quantized": 12.9012, "perplexity_ratio": 1.045,
              "held_out_samples": 8, "size_source": 3_000_000, "size_quantized": 1_000_000, "size_reduction": 0.6667}
HOSTILE = "<img src=x onerror=alert(1)>"  # shown as text wherever it appears, never run


def _safetensors(path: Path, seed: int, shape=(8, 8)) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"model.layers.0.self_attn.q_proj.weight": np.random.default_rng(seed).standard_normal(shape)
               .astype(np.float32)}, str(path))


def _folder(root: Path, name: str, seed: int, config: dict | None = None, adapter: dict | None = None) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    if adapter is not None:
        (folder / "adapter_config.json").write_text(json.dumps(adapter))
        _safetensors(folder / "adapter_model.safetensors", seed, (2, 8))
    else:
        (folder / "config.json").write_text(json.dumps({"model_type": "llama", **(config or {})}))
        _safetensors(folder / "model.safetensors", seed)
    return folder


def build_lineage(reg: Registry, root: Path, prefix: str = "acme/llama") -> dict[str, str]:
    """base -> adapter (base link from its peft config) -> merged (base + adapter links) -> quantized."""
    from registry.catalog import link, resolve, set_tag

    names = {"base": prefix, "adapter": f"{prefix}-lora", "merged": f"{prefix}-lora-merged",
             "quantized": f"{prefix}-lora-merged-gptq-int4"}
    import_folder(reg, _folder(root, "base", 1, {"architectures": [HOSTILE]}), names["base"])
    import_folder(reg, _folder(root, "adapter", 2, adapter={"peft_type": "LORA", "r": 2,
                                                            "base_model_name_or_path": names["base"]}),
                  names["adapter"])
    import_folder(reg, _folder(root, "merged", 3), names["merged"], kind="merged")
    import_folder(reg, _folder(root, "quantized", 4, {"quantization_config": {"quant_method": "gptq", "bits": 4}}),
                  names["quantized"])
    with reg.session() as s:
        merged, quantized = resolve(s, names["merged"]), resolve(s, names["quantized"])
        link(s, merged, resolve(s, names["base"]), "base")
        link(s, merged, resolve(s, names["adapter"]), "adapter")
        link(s, quantized, merged, "base")
        # what quantize.py records (its _metadata and _evaluate); a real GPTQ run takes minutes
        quantized.provenance = {**quantized.provenance, "evaluation": EVALUATION, "quantization": {
            "method": "gptq", "source_digest": merged.digest, "bits": 4, "group_size": 128, "desc_act": False,
            "sym": True, "calibration": {"digest": "sha256:" + "0" * 64, "source": "builtin", "samples": 32}}}
        s.info["actor"] = "token:release-bot"  # what the server sets for a request's session
        set_tag(s, names["quantized"], f"{names['quantized']}:prod")
    return names


def running_job(reg: Registry, done: int, total: int) -> int:
    from registry import jobs

    with reg.session() as s:
        job, _ = jobs.enqueue(s, "verify", {"artifact_ids": [], "all": True, "quick": False})
        job_id = job.id
    with reg.session() as s:
        jobs.claim(s, "web-test", job_id=job_id)
        jobs.renew(s, job_id, "web-test", done=done, total=total, unit="B", message="hashing model.safetensors")
    return job_id


def set_progress(reg: Registry, job_id: int, done: int) -> None:
    from registry import jobs

    with reg.session() as s:
        jobs.renew(s, job_id, "web-test", done=done)


def finish_job(reg: Registry, job_id: int) -> None:
    from registry import jobs

    with reg.session() as s:
        jobs.complete(s, job_id, "web-test", message="verified")


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def shots() -> Path:
    default = Path(__file__).resolve().parent.parent / "test-artifacts" / "screenshots"
    folder = Path(os.environ.get("REGISTRY_TEST_ARTIFACTS") or default)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def shoot(page, shots: Path, name: str) -> None:
    path = shots / f"web-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The SQLite scenario served by uvicorn in a thread; a read token and a logged-in browser state."""
    root = tmp_path_factory.mktemp("web")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REGISTRY_HOME", str(root / "home"))
        mp.delenv("REGISTRY_DATABASE_URL", raising=False)
        reg = Registry(root / "home")
        reg.init()
        names = build_lineage(reg, root / "folders")
        job_id = running_job(reg, 250_000, 1_000_000)
        token = make_token(reg, "read", "alice")
        with serve_in_thread(reg) as url:
            yield SimpleNamespace(reg=reg, url=url, token=token, names=names, job_id=job_id)
    from registry.db import dispose_all

    dispose_all()


def log_in(browser, url: str, token: str, path: str = "/", viewport=None):
    """A new browser context logged in through the form; returns (context, page) on `path`."""
    context = browser.new_context(viewport=viewport or {"width": 1280, "height": 900})
    page = context.new_page()
    page.on("dialog", lambda d: pytest.fail(f"a script ran: dialog {d.message!r}"))
    response = page.goto(url + path)
    assert response.status == 401
    page.fill("#token", token)
    page.click("button[type=submit]")
    page.wait_for_url(url + path)
    return context, page


def test_login_with_a_token_and_back_to_the_page_asked_for(browser, site, shots):
    context = browser.new_context()
    page = context.new_page()
    response = page.goto(site.url + "/models/" + site.names["merged"])
    assert response.status == 401 and page.locator("h1").inner_text() == "Log in"
    page.fill("#token", "rgt_not-a-token")
    page.click("button[type=submit]")
    assert page.locator(".error").inner_text() == "unknown or revoked token"
    shoot(page, shots, "login-refused")
    page.fill("#token", site.token)
    page.click("button[type=submit]")
    page.wait_for_url(site.url + "/models/" + site.names["merged"])
    assert page.locator("h1").inner_text() == site.names["merged"]
    assert "alice · read" in page.locator(".who").inner_text()
    [cookie] = context.cookies()
    assert (cookie["name"], cookie["httpOnly"], cookie["sameSite"], cookie["path"]) == \
        ("registry_token", True, "Strict", "/")
    page.click("text=Log out")
    page.wait_for_url(site.url + "/login")
    assert context.cookies() == [] and page.goto(site.url + "/").status == 401
    context.close()


def test_login_never_redirects_off_site(site):
    for next_path in ("//evil.example/x", "https://evil.example/", "/\\evil.example", "javascript:alert(1)"):
        r = httpx.post(site.url + "/login", data={"token": site.token, "next": next_path})
        assert (r.status_code, r.headers["location"]) == (303, "/"), next_path
    r = httpx.post(site.url + "/login", data={"token": site.token, "next": "/jobs?x=1"})
    assert r.headers["location"] == "/jobs?x=1"
    assert "HttpOnly" in r.headers["set-cookie"] and "SameSite=strict" in r.headers["set-cookie"]


def test_stale_cookie_empty_token_and_anonymous_reading(site):
    from registry.tokens import revoke_token

    gone = make_token(site.reg, "read", "gone")
    with site.reg.session() as s:
        revoke_token(s, "gone")
    r = httpx.get(site.url + "/jobs", cookies={"registry_token": gone})
    assert r.status_code == 401 and "unknown or revoked token" in r.text and 'name="next" value="/jobs"' in r.text
    assert r.headers["content-security-policy"].startswith("default-src 'self'; script-src 'self'")
    r = httpx.post(site.url + "/login", data={"token": " ", "next": "/"})
    assert r.status_code == 422 and "paste a token" in r.text
    with serve_in_thread(site.reg, anonymous=True) as url:
        page = httpx.get(url + "/models/" + site.names["base"])
        assert page.status_code == 200 and "anonymous · read" in page.text and "HF_TOKEN" not in page.text


def test_bad_offset_is_an_html_error_page(site):
    cookies = {"registry_token": site.token}
    for offset in ("abc", "-1", "9223372036854775808", "9" * 5000, "2147483648"):
        r = httpx.get(site.url + "/", params={"offset": offset}, cookies=cookies)
        assert r.status_code == 422 and r.headers["content-type"].startswith("text/html"), offset
        assert "offset must be a whole number from 0 to 2147483647" in r.text, offset
    r = httpx.get(site.url + "/", params={"offset": "2147483647"}, cookies=cookies)
    assert r.status_code == 200 and "Past the last of 4 artifacts." in r.text
    r = httpx.get(site.url + "/", params={"offset": "10"}, cookies=cookies)  # the previous page starts at 0
    assert r.status_code == 200 and 'href="/" rel="prev"' in r.text


def test_search_and_kind_filter(browser, site, shots):
    context, page = log_in(browser, site.url, site.token)
    names = site.names
    rows = page.locator("table.artifacts tbody tr td.name")
    assert sorted(rows.all_inner_texts()) == sorted(names.values())
    page.fill("input[name=q]", "merged")
    page.press("input[name=q]", "Enter")
    page.wait_for_url(re.compile(r".*\?q=merged$"))
    assert sorted(rows.all_inner_texts()) == [names["merged"], names["quantized"]]
    page.click("a[data-kind=quantized]")  # the filter keeps the search
    page.wait_for_url(re.compile(r".*q=merged&kind=quantized$"))
    assert rows.all_inner_texts() == [names["quantized"]]
    assert page.locator(".count").inner_text() == "1–1 of 1 artifact"
    shoot(page, shots, "catalog-filtered")
    page.click("a[data-kind=adapter]")
    assert page.locator(".count").inner_text() == "No artifacts match."
    page.fill("input[name=q]", HOSTILE)  # reflected as text in the box, not markup
    page.press("input[name=q]", "Enter")
    page.wait_for_url(re.compile(r".*\?q=%3Cimg.*&kind=adapter$"))
    assert page.locator("input[name=q]").input_value() == HOSTILE
    page.goto(site.url + "/?kind=adapter")
    page.get_by_role("link", name=names["adapter"], exact=True).click()
    page.wait_for_url(site.url + "/models/" + names["adapter"])
    assert page.locator("svg.lineage .node").count() == 4
    context.close()


def test_artifact_page_lineage_evaluation_files_and_snippet(browser, site, shots):
    names = site.names
    context, page = log_in(browser, site.url, site.token, "/models/" + names["quantized"])
    nodes = page.locator("svg.lineage a.node")
    assert nodes.count() == 4
    order = sorted((float(n.locator("rect").get_attribute("x")), n.get_attribute("data-name")) for n in nodes.all())
    assert [name for _, name in order] == [names["base"], names["adapter"], names["merged"], names["quantized"]]
    assert page.locator("svg.lineage a.node.current").get_attribute("data-name") == names["quantized"]
    assert page.locator("svg.lineage .edge").count() == 4  # adapter->base, merged->base/adapter, quantized->merged
    evaluation = page.locator("section.evaluation").inner_text()
    assert "12.346 → 12.901" in evaluation and "×1.045" in evaluation and "66.7% smaller" in evaluation
    assert "2.9 MiB → 976.6 KiB" in evaluation and "GPTQ int4, group size 128, 32 calibration samples" in evaluation
    files = page.locator("table.files-table tbody tr")
    assert files.count() == 2
    with site.reg.read_session() as s:
        from registry.catalog import resolve

        expected = {f.path: f.sha256 for f in resolve(s, names["quantized"]).files}
    cells = [r.locator("td").all_inner_texts() for r in files.all()]
    assert {c[0]: c[2] for c in cells} == expected
    snippet = page.locator("#snippet").inner_text()
    assert snippet == (f"HF_ENDPOINT={site.url} python -c \"from transformers import AutoModelForCausalLM; "
                       f"AutoModelForCausalLM.from_pretrained('{names['quantized']}')\"")
    assert "HF_TOKEN=<your token>" in page.locator("section.use").inner_text()
    events = page.locator("table.events-table tbody tr")
    assert ["tagged", "token:release-bot"] == events.first.locator("td").all_inner_texts()[1:3]
    assert f"{names['quantized']}:prod" in page.locator(".badges").inner_text()
    shoot(page, shots, "artifact-quantized")
    page.locator("svg.lineage a.node", has_text="acme/llama").first.click()  # nodes link to their pages
    page.wait_for_url(site.url + "/models/" + names["base"])
    assert page.locator("svg.lineage a.node.current").get_attribute("data-name") == names["base"]
    metadata = page.locator("section.metadata").inner_text()
    assert HOSTILE in metadata  # the hostile architecture name is text
    assert page.goto(site.url + "/models/no/such-model").status == 404
    assert "no artifact, tag or digest named 'no/such-model'" in page.locator(".error").inner_text()
    context.close()


def test_jobs_page_progress_moves_live(browser, site, shots):
    context, page = log_in(browser, site.url, site.token, "/jobs")
    row = page.locator(f"#job-{site.job_id}")
    assert row.locator(".progress-text").inner_text() == "244.1 KiB / 976.6 KiB (25%)"
    fill = row.locator(".bar .fill")
    width = fill.evaluate("e => e.getBoundingClientRect().width")
    shoot(page, shots, "jobs-25")
    set_progress(site.reg, site.job_id, 750_000)
    # app.js polls GET /v1/jobs every second; the page's CSP forbids eval, so poll with locators
    playwright_api.expect(row.locator(".progress-text")).to_have_text("732.4 KiB / 976.6 KiB (75%)", timeout=5000)
    playwright_api.expect(row.locator("[role=progressbar]")).to_have_attribute("aria-valuenow", "75")
    deadline = time.monotonic() + 3  # the bar's width animates over 0.4 s
    while fill.evaluate("e => e.getBoundingClientRect().width") < width * 2.9 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fill.evaluate("e => e.getBoundingClientRect().width") == pytest.approx(width * 3, rel=0.02)
    assert row.locator(".state").inner_text() == "running"
    shoot(page, shots, "jobs-75")

    # Once every job on the page has finished, the page stops polling every second (every 10 s instead) ...
    polls: list[float] = []
    page.on("request", lambda r: polls.append(time.monotonic()) if "/v1/jobs" in r.url else None)
    finish_job(site.reg, site.job_id)
    playwright_api.expect(row.locator(".state")).to_have_text("succeeded", timeout=5000)
    finished_at = time.monotonic()
    page.wait_for_timeout(2500)
    assert [t for t in polls if t > finished_at + 0.2] == []
    assert "No job is running" in page.locator("#live-status").inner_text()
    # ... and asks again at once when the window gets the focus back.
    page.evaluate("() => window.dispatchEvent(new Event('focus'))")
    page.wait_for_timeout(1000)
    assert [t for t in polls if t > finished_at + 0.2]
    context.close()


def test_phone_has_no_horizontal_scroll(browser, site, shots):
    phone = {"width": 390, "height": 844}
    context, page = log_in(browser, site.url, site.token, viewport=phone)
    overflow = "document.documentElement.scrollWidth - document.documentElement.clientWidth"
    assert page.evaluate(overflow) <= 0
    shoot(page, shots, "phone-catalog")
    for path, name in (("/models/" + site.names["quantized"], "phone-artifact"), ("/jobs", "phone-jobs")):
        page.goto(site.url + path)
        assert page.evaluate(overflow) <= 0, path  # wide tables and the graph scroll inside their wrappers
        shoot(page, shots, name)
    context.close()


@pytest.mark.parametrize("home", ["postgresql"], indirect=True)
def test_pages_on_postgresql(browser, home, tmp_path, shots):
    reg = Registry()
    reg.init()
    names = build_lineage(reg, tmp_path / "folders", "team/model")
    token = make_token(reg, "read")
    with serve_in_thread(reg) as url:
        context, page = log_in(browser, url, token, "/?kind=merged")
        page.click(f"text={names['merged']}")
        assert page.locator("svg.lineage a.node").count() == 4
        assert page.locator("table.files-table tbody tr").count() == 2  # config.json, model.safetensors
        context.close()
