"""Session fixtures for the GGUF tests: GGUF files of conftest.py's tiny GGUF models (ggufmodels.py), converted
once by the registry's own converter (registry.gguf.converter), shared by every GGUF test module.

Use them from a test module with `pytest_plugins = ["gguf_fixtures"]` (not by importing the fixtures: a
fixture imported into two modules is built twice). Everything they return is shared: copy before changing.

    gguf_model("sp" | "bpe" | "qwen") -> Path            a model folder (conftest's *_model_template)
    gguf_file(kind, outtype, pre_tokenizer=None) -> Conversion   its GGUF file (.path), converted once
    gguf_file.start(kind, outtype, pre_tokenizer=None)           the same, started in the background
    sp_f16, sp_q8_0, sp_q4_k_m, bpe_f16, qwen_f16 -> Conversion
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

# general.name of each kind's GGUF files (convert passes the source artifact's name the same way).
MODEL_NAMES = {"sp": "tiny-sp", "bpe": "tiny-bpe", "qwen": "tiny-qwen"}


def model_files(folder: Path) -> dict[str, Path]:
    """{path in the artifact: path on disk} of a model folder, as convert passes an artifact's files."""
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


def convert_folder(folder: Path, work_dir: Path, outtype: str, model_name: str, pre_tokenizer: str | None = None,
                   reporter=None):
    """What convert does with a source's folder: plan the tokenizer, then run the converter into work_dir."""
    from registry.gguf.converter import run_converter
    from registry.gguf.options import gguf_filename
    from registry.gguf.tokenizer import plan_tokenizer

    plan = plan_tokenizer(model_files(folder), pre_tokenizer)
    work_dir.mkdir(parents=True, exist_ok=True)
    return run_converter(folder, work_dir, gguf_filename(model_name, outtype), outtype, model_name, plan, reporter)


@pytest.fixture(scope="session")
def gguf_model(request):
    """gguf_model(kind) -> the folder of a tiny model of that kind: conftest.py's session templates
    (sp_model_template, bpe_model_template, qwen_model_template), built on first use."""
    return lambda kind: request.getfixturevalue(f"{kind}_model_template")


@pytest.fixture(scope="session")
def gguf_file(gguf_model, tmp_path_factory):
    """gguf_file(kind, outtype, pre_tokenizer=None) -> the Conversion of that model (converted on first use).

    gguf_file.start(kind, outtype, ...) starts a conversion in the background and returns at once: a module
    that needs several files starts them all first, and two converter subprocesses then use both cores while
    the test process builds the next model.
    """
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="gguf-convert")
    made: dict[tuple, Future] = {}

    def start(kind: str, outtype: str, pre_tokenizer: str | None = None) -> Future:
        key = (kind, outtype, pre_tokenizer)
        if key not in made:
            folder = gguf_model(kind)  # built here, in the test's own thread
            work = tmp_path_factory.mktemp(f"gguf-{kind}-{outtype}")
            made[key] = pool.submit(convert_folder, folder, work, outtype, MODEL_NAMES[kind], pre_tokenizer)
        return made[key]

    def get(kind: str, outtype: str, pre_tokenizer: str | None = None):
        return start(kind, outtype, pre_tokenizer).result()

    get.start = start
    yield get
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="session")
def sp_f16(gguf_file):
    return gguf_file("sp", "f16")


@pytest.fixture(scope="session")
def sp_q8_0(gguf_file):
    return gguf_file("sp", "q8_0")


@pytest.fixture(scope="session")
def sp_q4_k_m(gguf_file):
    return gguf_file("sp", "q4_k_m")


@pytest.fixture(scope="session")
def bpe_f16(gguf_file):
    """The byte-level BPE model: its pre-tokenizer (gpt-2) is read from tokenizer.json."""
    return gguf_file("bpe", "f16")


@pytest.fixture(scope="session")
def qwen_f16(gguf_file):
    """The Qwen2-regex BPE model: its pre-tokenizer (qwen2) is read from tokenizer.json."""
    return gguf_file("qwen", "f16")
