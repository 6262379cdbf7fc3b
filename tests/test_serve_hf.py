"""The HF-compatible endpoint with the real clients: huggingface_hub (snapshot_download, hf_hub_download with a
download cut mid-way and resumed with Range, list_repo_files, model_info, refs, list_models) and transformers'
from_pretrained through HF_ENDPOINT, against a real uvicorn on 127.0.0.1, on SQLite and PostgreSQL.

One served registry per backend for the module (built with library calls): `acme/tiny` (the tiny Llama), a
changed copy `acme/tiny-next` with a sub-folder, tagged `acme/tiny:prod` (revision prod of acme/tiny), and a
one-segment repo `solo`. Tests that change the catalog add their own artifacts.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from conftest import _create_pg_database, _drop_pg_database, _pg_url, import_here, tag_here
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                    RepositoryNotFoundError, RevisionNotFoundError)
from serving import make_token, serve_in_thread

from registry import Registry
from registry.catalog import details, resolve
from registry.db import dispose_all


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def site(request, tiny_model_template, tmp_path_factory):
    """A served registry with acme/tiny, acme/tiny-next (= acme/tiny:prod) and solo; a read token."""
    work = tmp_path_factory.mktemp(f"hf-{request.param}")
    pg_name = _create_pg_database() if request.param == "postgresql" else None
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REGISTRY_HOME", str(work / "home"))
        mp.delenv("REGISTRY_DATABASE_URL", raising=False)
        if pg_name:
            mp.setenv("REGISTRY_DATABASE_URL", _pg_url(pg_name))
        try:
            reg = Registry()
            reg.init()
            import_here(tiny_model_template, "acme/tiny")
            nxt = work / "next"
            shutil.copytree(tiny_model_template, nxt)
            config = json.loads((nxt / "config.json").read_text())
            (nxt / "config.json").write_text(json.dumps({**config, "note": "next"}))
            (nxt / "extra" / "deep").mkdir(parents=True)
            (nxt / "extra" / "notes.txt").write_text("notes\n")
            (nxt / "extra" / "deep" / "a.txt").write_text("deep\n")
            import_here(nxt, "acme/tiny-next")
            tag_here("acme/tiny-next", "acme/tiny:prod")
            solo = work / "solo"
            shutil.copytree(tiny_model_template, solo)
            (solo / "README.md").write_text("# solo\n")
            import_here(solo, "solo")
            with reg.read_session() as s:
                infos = {name: details(s, resolve(s, name)) for name in ("acme/tiny", "acme/tiny-next", "solo")}
            token = make_token(reg, "read")
            with serve_in_thread(reg) as url:
                yield SimpleNamespace(url=url, token=token, reg=reg, work=work, template=tiny_model_template,
                                      infos=infos, commit={n: i["digest"][7:47] for n, i in infos.items()},
                                      api=HfApi(endpoint=url, token=token), backend=request.param)
        finally:
            dispose_all()
            if pg_name:
                _drop_pg_database(pg_name)


def files_of(site, name: str) -> dict[str, dict]:
    return {f["path"]: f for f in site.infos[name]["file_list"]}


def raw_request(site, method: str, target: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    """Send `target` exactly as given (no client-side normalization of `..` or percent-escapes)."""
    host, port = site.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest(method, target, skip_accept_encoding=True)
    for key, value in {"Authorization": f"Bearer {site.token}", **(headers or {})}.items():
        conn.putheader(key, value)
    conn.endheaders()
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body


def test_model_info_tree_refs_and_listing(site):
    api = site.api
    info = api.model_info("acme/tiny")
    assert info.id == "acme/tiny" and info.sha == site.commit["acme/tiny"]
    assert sorted(s.rfilename for s in info.siblings) == sorted(files_of(site, "acme/tiny"))
    detailed = api.model_info("acme/tiny", revision="main", files_metadata=True)
    for sibling in detailed.siblings:
        expected = files_of(site, "acme/tiny")[sibling.rfilename]
        assert (sibling.size, sibling.lfs.sha256, sibling.lfs.size) == (expected["size"], expected["sha256"],
                                                                      expected["size"])
    assert api.list_repo_files("acme/tiny") == sorted(files_of(site, "acme/tiny"))

    # A tag is a revision: by its name, and by its commit under the repo id that tags it.
    prod = api.model_info("acme/tiny", revision="prod")
    assert prod.sha == site.commit["acme/tiny-next"] != site.commit["acme/tiny"]
    assert api.model_info("acme/tiny", revision=prod.sha).sha == prod.sha
    assert "extra/deep/a.txt" in api.list_repo_files("acme/tiny", revision="prod")
    assert api.model_info("solo").sha == site.commit["solo"]  # a one-segment repo id
    assert api.list_repo_files("solo") == sorted(files_of(site, "solo"))
    assert [b.name for b in api.list_repo_refs("solo").branches] == ["main"]

    # The tree: every file an LFS file whose oid is its sha256; folders listed, non-recursively one level.
    entries = list(api.list_repo_tree("acme/tiny", revision="prod", recursive=True))
    by_path = {e.path: e for e in entries}
    assert {"extra", "extra/deep"} <= set(by_path) and type(by_path["extra"]).__name__ == "RepoFolder"
    notes = by_path["extra/notes.txt"]
    sha = files_of(site, "acme/tiny-next")["extra/notes.txt"]["sha256"]
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize 6\n".encode()
    assert (notes.size, notes.lfs.sha256, notes.lfs.pointer_size) == (6, sha, len(pointer))
    assert notes.blob_id == hashlib.sha1(b"blob %d\0" % len(pointer) + pointer).hexdigest()
    level = {e.path: type(e).__name__ for e in api.list_repo_tree("acme/tiny", path_in_repo="extra",
                                                                  revision="prod")}
    assert level == {"extra/deep": "RepoFolder", "extra/notes.txt": "RepoFile"}
    with pytest.raises(EntryNotFoundError):  # AutoTokenizer asks for this optional folder
        list(api.list_repo_tree("acme/tiny", path_in_repo="additional_chat_templates"))

    refs = api.list_repo_refs("acme/tiny")
    assert [(b.name, b.target_commit) for b in refs.branches] == [("main", site.commit["acme/tiny"])]
    assert [(t.name, t.target_commit) for t in refs.tags] == [("prod", site.commit["acme/tiny-next"])]

    assert {m.id for m in api.list_models(search="TINY")} >= {"acme/tiny", "acme/tiny-next"}
    assert "solo" not in {m.id for m in api.list_models(author="acme")}
    assert [m.id for m in api.list_models(search="no-such-model")] == []
    # Pagination: the next page's link is absolute (huggingface_hub cannot follow a relative one).
    first = httpx.get(f"{site.url}/api/models", params={"limit": 1, "search": "tiny"},
                      headers={"Authorization": f"Bearer {site.token}"})
    assert first.status_code == 200 and len(first.json()) == 1
    nxt = first.links["next"]["url"]
    assert nxt.startswith(site.url + "/api/models?")
    second = httpx.get(nxt, headers={"Authorization": f"Bearer {site.token}"}).json()
    assert len(second) == 1 and second[0]["id"] != first.json()[0]["id"]


def test_snapshot_download_and_pinned_files(site, tmp_path):
    path = Path(snapshot_download("acme/tiny", endpoint=site.url, token=site.token, cache_dir=tmp_path))
    assert path.name == site.commit["acme/tiny"]
    got = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
    assert got == sorted(files_of(site, "acme/tiny"))
    for rel in got:
        assert (path / rel).read_bytes() == (site.template / rel).read_bytes()
    # The HF cache names each blob by the ETag: the registry's own sha256.
    blobs = {p.name for p in (tmp_path / "models--acme--tiny" / "blobs").iterdir()}
    assert blobs == {f["sha256"] for f in files_of(site, "acme/tiny").values()}

    prod = Path(snapshot_download("acme/tiny", revision="prod", endpoint=site.url, token=site.token,
                                  cache_dir=tmp_path))
    assert prod.name == site.commit["acme/tiny-next"]
    assert (prod / "extra" / "deep" / "a.txt").read_text() == "deep\n"
    one = hf_hub_download("solo", "README.md", revision=site.commit["solo"], endpoint=site.url,
                          token=site.token, cache_dir=tmp_path)
    assert Path(one).read_text() == "# solo\n"


def test_abbreviated_commit_ids_are_revisions(site, tmp_path):
    full = site.commit["acme/tiny"]
    for short in (full[:7], full[:12], full[:39]):
        info = site.api.model_info("acme/tiny", revision=short)
        assert info.sha == full  # the commit is always named in full
    prod = site.commit["acme/tiny-next"]  # a tag's commit, abbreviated, under the repo id that tags it
    assert site.api.model_info("acme/tiny", revision=prod[:8]).sha == prod
    path = hf_hub_download("acme/tiny", "config.json", revision=full[:10], endpoint=site.url, token=site.token,
                           cache_dir=tmp_path)
    assert Path(path).parent.name == full and Path(path).read_bytes() == (site.template / "config.json").read_bytes()
    status, headers, _ = raw_request(site, "HEAD", f"/acme/tiny/resolve/{full[:7]}/config.json")
    assert (status, headers["x-repo-commit"]) == (200, full)
    with pytest.raises(RevisionNotFoundError):  # another repo's commit, abbreviated
        site.api.model_info("acme/tiny", revision=site.commit["solo"][:10])
    with pytest.raises(RevisionNotFoundError):
        site.api.model_info("acme/tiny", revision=full[:6])  # too short to be a commit id: a tag, and none
    status, headers, _ = raw_request(site, "HEAD", f"/acme/tiny/resolve/{'f' if full[0] != 'f' else 'e'}"
                                     f"{full[1:7]}/config.json")
    assert (status, headers["x-error-code"]) == (404, "RevisionNotFound")
    assert "none of its artifact's or tags' commits starts with it" in headers["x-error-message"]


def test_abbreviated_commit_matching_two_artifacts_is_ambiguous():
    from registry.models import Artifact
    from registry.server import hfrepo

    def artifact(id_: int, commit: str) -> Artifact:
        return Artifact(id=id_, name=f"a{id_}", digest="sha256:" + commit.ljust(64, "0"))

    main, one, other = artifact(1, "abcdef1" + "1" * 33), artifact(2, "abcdef2" + "2" * 33), \
        artifact(3, "abcdef2" + "3" * 33)
    tagged = [("prod", main), ("one", one), ("other", other)]  # main is also tagged: one artifact, not two
    assert hfrepo._by_commit_prefix(main, tagged, "acme/x", "abcdef1") is main
    assert hfrepo._by_commit_prefix(main, tagged, "acme/x", "abcdef22") is one
    with pytest.raises(hfrepo.RevisionNotFound, match=r"abcdef2 of acme/x is ambiguous: it starts the commits "
                                                      r"abcdef2222.*, abcdef2333.*; give more digits"):
        hfrepo._by_commit_prefix(main, tagged, "acme/x", "abcdef2")


def test_repo_named_models_downloads_and_web_pages_still_answer(site, tmp_path):
    # The HF routes come before the web pages (app.py), so /models/tiny/resolve/... is repo models/tiny's file,
    # while /models/<name> with no resolve segment stays the artifact page for one- to three-segment names.
    import_here(site.template, "models/tiny")
    path = hf_hub_download("models/tiny", "config.json", endpoint=site.url, token=site.token, cache_dir=tmp_path)
    assert Path(path).read_bytes() == (site.template / "config.json").read_bytes()
    assert site.api.model_info("models/tiny").sha == path.split("/snapshots/")[1].split("/")[0]
    for page, name in (("/models/acme/tiny", "acme/tiny"), ("/models/solo", "solo"),
                       ("/models/models/tiny", "models/tiny"), ("/models/acme/tiny:prod", "acme/tiny-next")):
        r = httpx.get(site.url + page, headers={"Authorization": f"Bearer {site.token}"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), page
        assert f'<h1 class="artifact-name">{name}</h1>' in r.text, page


class CuttingProxy:
    """A TCP proxy to the server that cuts the first GET of `needle` (without Range) after `cut_at` body bytes,
    as a dropped connection would; it records each request head and response status line."""

    def __init__(self, upstream: str, needle: bytes, cut_at: int):
        self.upstream = upstream.removeprefix("http://").split(":")
        self.needle, self.cut_at, self.cut_done = needle, cut_at, False
        self.requests: list[bytes] = []
        self.statuses: list[bytes] = []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        up = socket.create_connection((self.upstream[0], int(self.upstream[1])))
        cut = threading.Event()

        def forward_requests() -> None:
            try:
                while data := client.recv(65536):
                    head = data.split(b"\r\n\r\n")[0]
                    if data.startswith((b"GET ", b"HEAD ")):
                        self.requests.append(head)
                        if (data.startswith(b"GET ") and self.needle in head.split(b"\r\n")[0]
                                and b"\r\nrange:" not in head.lower() and not self.cut_done):
                            self.cut_done = True
                            cut.set()
                    up.sendall(data)
            except OSError:
                pass

        threading.Thread(target=forward_requests, daemon=True).start()
        pending = b""
        try:
            while data := up.recv(1 << 20):
                if data.startswith(b"HTTP/1.1 "):
                    self.statuses.append(data.split(b"\r\n")[0])
                if not cut.is_set():
                    client.sendall(data)
                    continue
                pending += data
                end = pending.find(b"\r\n\r\n")
                if end >= 0 and len(pending) >= end + 4 + self.cut_at:
                    client.sendall(pending[:end + 4 + self.cut_at])
                    break
        except OSError:
            pass
        for s in (client, up):  # shutdown first: close alone leaves the other thread's recv holding the socket
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.server.close()


def test_resumed_range_download_and_headers(site, tmp_path):
    # huggingface_hub keeps what it received only in 10 MiB steps: a file above that, cut after the first step.
    folder = tmp_path / "big"
    shutil.copytree(site.template, folder)
    (folder / "big.dat").write_bytes(os.urandom(11 * 1024 * 1024))
    name = f"acme/big-{site.backend}"
    import_here(folder, name)
    proxy = CuttingProxy(site.url, b"/big.dat", cut_at=10 * 1024 * 1024 + 200_000)
    try:
        path = hf_hub_download(name, "big.dat", endpoint=proxy.url, token=site.token, cache_dir=tmp_path / "c")
    finally:
        proxy.close()
    assert proxy.cut_done  # the first GET was cut: the client resumed with Range and got the rest (206)
    assert any(b"\r\nrange: bytes=10485760-" in r.lower() for r in proxy.requests)
    assert b"HTTP/1.1 206 Partial Content" in proxy.statuses
    assert Path(path).read_bytes() == (folder / "big.dat").read_bytes()

    weights = files_of(site, "acme/tiny")["model.safetensors"]
    target = "/acme/tiny/resolve/main/model.safetensors"
    status, headers, body = raw_request(site, "HEAD", target)
    assert status == 200 and body == b""
    assert headers["etag"] == headers["x-linked-etag"] == f'"{weights["sha256"]}"'
    assert headers["x-linked-size"] == headers["content-length"] == str(weights["size"])
    assert headers["x-repo-commit"] == site.commit["acme/tiny"]
    assert headers["accept-ranges"] == "bytes" and headers["content-type"] == "application/octet-stream"
    assert not [k for k in headers if "xet" in k] and "link" not in headers

    whole = (site.template / "model.safetensors").read_bytes()
    size = len(whole)
    for rng, part, content_range in [("bytes=0-9", whole[:10], f"bytes 0-9/{size}"),
                                     ("bytes=100-", whole[100:], f"bytes 100-{size - 1}/{size}"),
                                     ("bytes=-7", whole[-7:], f"bytes {size - 7}-{size - 1}/{size}"),
                                     (f"bytes={size - 1}-{size + 50}", whole[-1:], f"bytes {size - 1}-{size - 1}/{size}")]:
        status, headers, body = raw_request(site, "GET", target, {"Range": rng})
        assert (status, body, headers["content-range"]) == (206, part, content_range), rng
        assert headers["content-length"] == str(len(part))
    status, headers, _ = raw_request(site, "GET", target, {"Range": f"bytes={size}-"})
    assert status == 416 and headers["content-range"] == f"bytes */{size}" and "x-error-message" in headers
    # Positions longer than any int Python parses at once (4300 digits): valid HTTP, read as "past the end".
    huge = "9" * 5000
    for rng, part in [(f"bytes=0-{huge}", whole), (f"bytes=-{huge}", whole),
                      (f"bytes={'0' * 5000}5-9", whole[5:10])]:
        status, headers, body = raw_request(site, "GET", target, {"Range": rng})
        assert (status, body) == (206, part), rng[:20]
    status, headers, _ = raw_request(site, "GET", target, {"Range": f"bytes={huge}-"})
    assert status == 416 and headers["content-range"] == f"bytes */{size}"
    assert len(headers["x-error-message"]) < 200  # the header is not echoed whole
    status, _, body = raw_request(site, "GET", target, {"Range": "bytes=0-9", "If-Range": '"other"'})
    assert (status, body) == (200, whole)  # the If-Range etag is not this file's: the whole file


def test_unknown_repo_revision_and_file_raise_hub_errors(site, tmp_path):
    api, kw = site.api, dict(endpoint=site.url, token=site.token, cache_dir=tmp_path)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("acme/nope")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("acme/nope", "config.json", **kw)
    with pytest.raises(RevisionNotFoundError):
        api.model_info("acme/tiny", revision="nope")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("acme/tiny", "config.json", revision="nope", **kw)
    with pytest.raises(RevisionNotFoundError):  # a commit of another repo is not one of acme/tiny's
        api.model_info("acme/tiny", revision=site.commit["solo"])
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("acme/tiny", "missing.json", **kw)
    # The absence is cached under the commit (X-Repo-Commit on the 404), so the next lookup asks nothing.
    assert (tmp_path / "models--acme--tiny" / ".no_exist" / site.commit["acme/tiny"] / "missing.json").exists()
    status, headers, body = raw_request(site, "HEAD", "/acme/tiny/resolve/main/missing.json")
    assert (status, headers["x-error-code"], headers["x-repo-commit"]) == (404, "EntryNotFound",
                                                                         site.commit["acme/tiny"])
    assert "missing.json" in headers["x-error-message"]
    # No token, or a wrong one: refused (401), never a file.
    with pytest.raises(HfHubHTTPError) as refused:
        hf_hub_download("acme/tiny", "config.json", endpoint=site.url, token=False, cache_dir=tmp_path / "anon")
    assert refused.value.response.status_code == 401
    status, _, _ = raw_request(site, "GET", "/acme/tiny/resolve/main/config.json",
                               {"Authorization": "Bearer rgt_wrong"})
    assert status == 401


E, V, R = "EntryNotFound", "RevisionNotFound", "RepoNotFound"
TRAVERSALS = [  # (request target sent verbatim, the X-Error-Code; None: no route matches, the server's own 404;
    # 422: refused before routing)
    ("/acme/tiny/resolve/main/../../../../secret.txt", E),
    ("/acme/tiny/resolve/main/%2e%2e/%2e%2e/%2e%2e/%2e%2e/secret.txt", E),
    ("/acme/tiny/resolve/main/%2E%2E%2F%2E%2E%2F%2E%2E%2F%2E%2E%2Fsecret.txt", E),
    ("/acme/tiny/resolve/main/extra/..%2f..%2f..%2f..%2fsecret.txt", E),
    ("/acme/tiny/resolve/main//etc/passwd", E),
    ("/acme/tiny/resolve/main/%2Fetc%2Fpasswd", E),
    ("/acme/tiny/resolve/main/..%5C..%5C..%5C..%5Csecret.txt", E),
    ("/acme/tiny/resolve/main/config.json%00.txt", 422),  # a NUL anywhere: 422 before any route (app.RefuseNul)
    ("/acme/tiny/resolve/main/./config.json", E),
    ("/acme/tiny/resolve/..%2F..%2F..%2Fsecret.txt/config.json", V),
    ("/acme/tiny/resolve/%2e%2e/config.json", V),
    ("/acme/tiny/resolve/prod%00/config.json", 422),
    ("/%2e%2e/%2e%2e/resolve/main/secret.txt", R),
    ("/acme%5C..%5Ctiny/resolve/main/config.json", R),
    ("/acme/..%2F..%2Fsecret.txt/resolve/main/config.json", None),
    ("/api/models/acme/tiny/tree/main/%2e%2e%2f%2e%2e", E),
    ("/api/models/acme/tiny/tree/main/..", E),
    ("/api/models/acme/tiny/tree/%2e%2e%2f%2e%2e", V),
    ("/api/models/%2e%2e/tiny/revision/main", R),
    ("/api/models/acme/tiny/revision/..%2f..", V),
    ("/api/models/%2Fetc", None),
]


def test_error_messages_quote_the_path_as_asked(site):
    status, headers, body = raw_request(site, "GET", "/acme/tiny/resolve/main/..%5C..%5Csecret.txt")
    assert (status, headers["x-error-code"]) == (404, "EntryNotFound")
    assert json.loads(body)["error"].startswith('no file "..\\..\\secret.txt": ')  # one backslash each, as sent
    assert headers["x-error-message"] == json.loads(body)["error"]
    status, headers, _ = raw_request(site, "GET", "/acme/tiny/resolve/main/a%01%C3%A9/..")
    assert headers["x-error-message"].startswith('no file "a\\x01\\xe9/..": ')


def test_path_traversal_never_leaves_the_catalog(site):
    (site.work / "secret.txt").write_text("TOPSECRET")
    for target, code in TRAVERSALS:
        status, headers, body = raw_request(site, "GET", target)
        expected = (422, None) if code == 422 else (404, code)
        assert (status, headers.get("x-error-code")) == expected, target
        assert b"TOPSECRET" not in body and b"root:" not in body, target
    # A raw NUL byte in the request line: refused by the HTTP parser itself.
    host, port = site.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"GET /acme/tiny/resolve/main/config.json\x00/../../secret.txt HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer " + site.token.encode() + b"\r\nConnection: close\r\n\r\n")
        reply = b"".join(iter(lambda: sock.recv(65536), b""))
    assert reply.startswith(b"HTTP/1.1 400") and b"TOPSECRET" not in reply


ODD_INPUT = ["/api/models?search=%00", "/api/models?author=a%00b", "/api/models?search=%ED%A0%80",
             "/api/models?limit=0", "/api/models?cursor=-1", "/api/models?filter=%00&sort=%00&full=true",
             "/api/models/%C3%A9", "/api/models/a%00", "/api/models/acme/tiny/revision/%C3%A9",
             "/api/models/acme/tiny/tree/main?cursor=x", "/api/models/acme/tiny/tree/%ff/x",
             "/api/models/acme/tiny/refs?include_prs=x", "/%ff/resolve/main/x", "/acme/tiny/resolve/main/%ff%fe",
             "/acme/tiny/resolve/main/" + "a/" * 600 + "x", "/api/models?cursor=99999999999999999999",
             "/api/models?cursor=2147483648", "/api/models?limit=99999999999999999999",
             "/api/models/acme/tiny/tree/main?cursor=99999999999999999999"]


def test_odd_input_is_refused_not_a_server_error(site):
    for target in ODD_INPUT:
        status, _, body = raw_request(site, "GET", target)
        assert status in (200, 404, 422), (target, status, body[:200])
        if ("search=" in target or "author=" in target) and "%00" not in target:  # NUL: 422 (app.RefuseNul)
            assert (status, json.loads(body)) == (200, []), target  # no name holds such characters


def test_corrupt_or_changed_artifact_is_not_served(site, tmp_path):
    from registry.verify import verify

    folder = tmp_path / "fragile"
    shutil.copytree(site.template, folder)
    (folder / "notes.txt").write_text(f"changed later {site.backend}\n")
    (folder / "gone.txt").write_text(f"removed later {site.backend}\n")
    name = f"acme/fragile-{site.backend}"
    import_here(folder, name)
    with site.reg.read_session() as s:
        files = {f["path"]: f for f in details(s, resolve(s, name))["file_list"]}
    assert raw_request(site, "GET", f"/{name}/resolve/main/notes.txt")[0] == 200

    notes = site.reg.store.path(files["notes.txt"]["sha256"])
    os.chmod(notes, 0o644)
    notes.write_bytes(notes.read_bytes().upper())  # same size, new mtime: not the file that was verified
    status, headers, _ = raw_request(site, "GET", f"/{name}/resolve/main/notes.txt")
    assert status == 409 and "changed on disk" in headers["x-error-message"]
    assert f"registry verify {name}" in headers["x-error-message"]
    site.reg.store.path(files["gone.txt"]["sha256"]).unlink()
    status, headers, _ = raw_request(site, "HEAD", f"/{name}/resolve/main/gone.txt")
    assert status == 409 and "missing from the store" in headers["x-error-message"]
    with pytest.raises((HfHubHTTPError, LocalEntryNotFoundError)):
        hf_hub_download(name, "notes.txt", endpoint=site.url, token=site.token, cache_dir=tmp_path / "c1")

    verify(site.reg, [name])  # finds the damage and marks the artifact corrupt: nothing of it is served now
    status, headers, _ = raw_request(site, "GET", f"/{name}/resolve/main/config.json")
    assert status == 409 and f"registry repair {name}" in headers["x-error-message"]
    assert "corrupt" in headers["x-error-message"]
    status, headers, _ = raw_request(site, "GET", f"/api/models/{name}")  # the listing stays readable, warned
    assert status == 200 and "corrupt" in headers["x-hf-warning"]
    with pytest.raises((HfHubHTTPError, LocalEntryNotFoundError)) as refused:
        snapshot_download(name, endpoint=site.url, token=site.token, cache_dir=tmp_path / "c2")
    assert "registry repair" in str(refused.value) or "registry repair" in str(refused.value.__cause__)


TRANSFORMERS_SCRIPT = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
remote = AutoModelForCausalLM.from_pretrained("acme/tiny")
local = AutoModelForCausalLM.from_pretrained(sys.argv[1])
same = all(torch.equal(a, b) for a, b in zip(remote.state_dict().values(), local.state_dict().values()))
tok = AutoTokenizer.from_pretrained("acme/tiny")
ids = tok("A catalog of model weights")["input_ids"]
print(json.dumps({"same": same, "ids": ids, "local_ids": AutoTokenizer.from_pretrained(sys.argv[1])(
    "A catalog of model weights")["input_ids"]}))
"""


def test_transformers_from_pretrained_through_hf_endpoint(site, tmp_path):
    env = {**os.environ, "HF_ENDPOINT": site.url, "HF_TOKEN": site.token, "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_DISABLE_TELEMETRY": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    proc = subprocess.run([sys.executable, "-c", TRANSFORMERS_SCRIPT, str(site.template)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["same"] and out["ids"] == out["local_ids"]
