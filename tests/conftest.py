"""Shared fixtures: tiny real models, registry homes, fresh SQLite and PostgreSQL databases, a CLI runner."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from hubproxy import HubProxy, Olah, commit_change, git, make_repo  # noqa: E402
from tinymodel import build_tiny_llama  # noqa: E402

from registry import Registry  # noqa: E402
from registry.db import dispose_all  # noqa: E402

# GGUF files converted once per session, shared by every GGUF test module (tests/gguf_fixtures.py).
pytest_plugins = ["gguf_fixtures"]

PG_ADMIN_URL = os.environ.get("REGISTRY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REGISTRY_BIN = str(Path(sys.executable).parent / "registry")


@pytest.fixture(scope="session")
def tiny_model_template(tmp_path_factory) -> Path:
    """A tiny random Llama with a locally trained tokenizer, built once per session."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", seed=0)


@pytest.fixture(scope="session")
def sp_model_template(tmp_path_factory) -> Path:
    """A tiny random Llama (hidden 256) with a SentencePiece tokenizer.model trained locally (GGUF tests)."""
    from ggufmodels import build_sp_llama

    return build_sp_llama(tmp_path_factory.mktemp("gguf-sp") / "sp", seed=0)


@pytest.fixture(scope="session")
def bpe_model_template(tmp_path_factory) -> Path:
    """The same shape with tinymodel.py's byte-level BPE tokenizer (tokenizer.json only, GPT-2's regex)."""
    from ggufmodels import build_bpe_llama

    return build_bpe_llama(tmp_path_factory.mktemp("gguf-bpe") / "bpe", seed=0)


@pytest.fixture(scope="session")
def qwen_model_template(tmp_path_factory) -> Path:
    """The same shape with a byte-level BPE tokenizer that splits with Qwen2's regex."""
    from ggufmodels import build_qwen_style_llama

    return build_qwen_style_llama(tmp_path_factory.mktemp("gguf-qwen") / "qwen", seed=0)


@pytest.fixture
def tiny_model(tiny_model_template, tmp_path) -> Path:
    """A private copy of the tiny Llama folder that a test may change."""
    dest = tmp_path / "llama"
    shutil.copytree(tiny_model_template, dest)
    return dest


# End-to-end modules whose tests run once per catalog backend: every test there that takes `home` (and not
# `db_url`, which is parametrized itself) becomes test_x[sqlite] and test_x[postgresql], so a bug that only
# PostgreSQL shows (a too-long key, a lock, a type) fails a test. `@pytest.mark.sqlite_only` opts a test out.
BOTH_BACKENDS = {"test_catalog", "test_pull", "test_lineage", "test_merge", "test_quantize", "test_jobs",
                 "test_pull_first_try", "test_gguf_convert"}


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "sqlite_only: run on the SQLite catalog only in a module that runs on both")


def pytest_generate_tests(metafunc) -> None:
    if (metafunc.module.__name__ in BOTH_BACKENDS and "home" in metafunc.fixturenames
            and "db_url" not in metafunc.fixturenames and not metafunc.definition.get_closest_marker("sqlite_only")):
        metafunc.parametrize("home", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture
def home(request, tmp_path, monkeypatch) -> Path:
    """A fresh REGISTRY_HOME for this test, also set for subprocesses; its catalog is SQLite in the home, or a
    fresh PostgreSQL database (REGISTRY_DATABASE_URL) when the test is parametrized with "postgresql"."""
    path = tmp_path / "home"
    monkeypatch.setenv("REGISTRY_HOME", str(path))
    monkeypatch.delenv("REGISTRY_DATABASE_URL", raising=False)
    pg_name = _create_pg_database() if getattr(request, "param", "sqlite") == "postgresql" else None
    if pg_name:
        monkeypatch.setenv("REGISTRY_DATABASE_URL", _pg_url(pg_name))
    yield path
    dispose_all()
    if pg_name:
        _drop_pg_database(pg_name)


def _pg_url(name: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(PG_ADMIN_URL).set(drivername="postgresql+psycopg", database=name).render_as_string(False)


def _create_pg_database() -> str:
    import psycopg

    name = f"registry_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name


def _drop_pg_database(name: str) -> None:
    import psycopg

    dispose_all()
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, home, monkeypatch) -> str:
    """The catalog URL for this test: a SQLite file in the home, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        home.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{home / 'registry.db'}"
        yield url
        return
    name = _create_pg_database()
    url = _pg_url(name)
    monkeypatch.setenv("REGISTRY_DATABASE_URL", url)
    yield url
    _drop_pg_database(name)


@pytest.fixture
def reg(home) -> Registry:
    """A Registry on the test's home (SQLite)."""
    r = Registry()
    r.init()
    return r


@pytest.fixture
def small_fs(tmp_path):
    """A 2 MiB tmpfs to run out of space on (mounting needs root, as in CI; skipped where it is refused)."""
    mount = tmp_path / "small"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)])


def run_cli(*args: str, env: dict | None = None, check: int | None = 0, **kw) -> subprocess.CompletedProcess:
    """Run the real `registry` console script; assert its exit code when `check` is not None."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([REGISTRY_BIN, *args], capture_output=True, text=True, env=full_env, **kw)
    if check is not None:
        assert proc.returncode == check, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def cli_json(*args: str, **kw):
    """Run a read command with --json and parse its output."""
    return json.loads(run_cli(*args, "--json", **kw).stdout)


def write_safetensors_header(path: Path, header: dict, data_len: int, length_override: int | None = None) -> None:
    """Write a safetensors-shaped file with an arbitrary (possibly invalid) header."""
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", length_override if length_override is not None else len(raw)))
        f.write(raw)
        f.write(b"\0" * data_len)


def blob_files(home: Path) -> list[Path]:
    """Every blob file in a registry home."""
    return sorted(p for p in (home / "blobs" / "sha256").glob("*/*") if p.is_file())


# -- the hub for pull tests (test_pull, test_pull_first_try, ...): olah behind a counting, faulty proxy --

def _random_safetensors(seed: int, mib: int) -> bytes:
    """A safetensors file of `mib` MiB of random float32 (incompressible, distinct per seed)."""
    import numpy as np
    from safetensors.numpy import save

    rng = np.random.default_rng(seed)
    return save({"w": rng.standard_normal(mib * 256 * 1024).astype(np.float32)})


@pytest.fixture(scope="session")
def hub(tiny_model_template, tmp_path_factory):
    """olah serving the test repos, and a proxy in front of it; yields a namespace of both and the commits."""
    work = tmp_path_factory.mktemp("hub")
    mirrors = work / "mirrors"
    tiny = make_repo(mirrors, "acme/tiny", tiny_model_template)
    first = git(tiny, "rev-parse", "HEAD")
    config = json.loads((tiny_model_template / "config.json").read_text())
    second = commit_change(tiny, "config.json", json.dumps({**config, "revision_note": "v2"}).encode())
    git(tiny, "tag", "v1", first)
    make_repo(mirrors, "acme/tiny-lfs", tiny_model_template, lfs=True)
    make_repo(mirrors, "acme/big", extra={"model.safetensors": _random_safetensors(1, 3),
                                          "config.json": b'{"model_type": "llama"}'})
    make_repo(mirrors, "acme/moving", tiny_model_template)
    import torch

    pickled = work / "pickled"
    pickled.mkdir()
    torch.save({"w": torch.zeros(8)}, pickled / "pytorch_model.bin")
    (pickled / "config.json").write_text('{"model_type": "llama"}')
    make_repo(mirrors, "acme/pickle-only", pickled)
    olah = Olah(mirrors, work)
    proxy = HubProxy(olah.url)

    class Hub:
        pass

    h = Hub()
    h.olah, h.proxy, h.url, h.mirrors, h.first, h.second = olah, proxy, proxy.url, mirrors, first, second
    yield h
    proxy.shutdown()
    olah.stop()


@pytest.fixture
def hubp(hub, home, monkeypatch):
    """The hub with a clean proxy, and HF_ENDPOINT pointing at it for subprocesses."""
    hub.proxy.reset()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(home.parent / "hf-home"))  # no login store from this machine
    return hub


# GPTQModel packs quantized weights with a C++ extension that it compiles on first use (about 35 s on a 2-core
# machine, once per machine: every CI run), unless told to use its Python code, which writes the same bytes
# (the same digest); the tiny test models pack in milliseconds either way.
os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")


# -- test setup by library calls in this process, where the command itself is not what a test checks (import and
# tag as commands: test_catalog, test_lineage, test_bad_input, ...). Each saves starting a CLI process (about a
# second with its job); they use the test's REGISTRY_HOME and REGISTRY_DATABASE_URL, and record no job.

def import_here(folder, name: str, **kw) -> dict:
    """What `registry import FOLDER --name NAME --json` registers (kw: base, kind, link, ...)."""
    from registry.importer import import_folder

    return import_folder(Registry(), folder, name, **kw).to_dict()


def tag_here(ref: str, tag: str) -> None:
    """What `registry tag REF TAG` does."""
    from registry.catalog import set_tag

    with Registry().session() as s:
        set_tag(s, ref, tag)
