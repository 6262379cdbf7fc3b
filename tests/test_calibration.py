"""The built-in calibration set and how many samples `quantize` takes when --samples is not given."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from importlib import resources
from pathlib import Path

import pytest

from registry.calibration import BUILTIN, DEFAULT_SAMPLES, load_calibration
from registry.errors import BadInput

CHINESE = re.compile(r"[\u4e00-\u9fff]")
REPO = Path(__file__).resolve().parent.parent


def _records() -> list[dict]:
    raw = resources.files("registry").joinpath(BUILTIN).read_text(encoding="utf-8")
    return [json.loads(line) for line in raw.splitlines() if line.strip()]


@pytest.mark.parametrize("seed", [0, 1, 7, 42, 2024])
def test_builtin_set_gives_the_default_samples_with_any_seed(seed):
    calib = load_calibration(None, None, seed)
    assert (len(calib.samples), calib.warnings, calib.source) == (DEFAULT_SAMPLES, [], "builtin")
    assert len(calib.held_out) >= 40 and not set(calib.samples) & set(calib.held_out)
    # An explicit --samples up to what the set holds is served as asked.
    assert len(load_calibration(None, 150, seed).samples) == 150


def test_builtin_set_mixes_languages_dialogue_and_code():
    records = _records()
    texts = [r["text"] for r in records if "text" in r]
    chats = [r["conversations"] for r in records if "conversations" in r]
    assert len(texts) + len(chats) == len(records) >= 180
    assert len(set(map(json.dumps, records))) == len(records), "no sample twice: held-out stays unseen"
    assert sum(bool(CHINESE.search(t)) for t in texts) >= 40  # Chinese prose (and a commented snippet)
    assert all(2 <= len(c) <= 4 for c in chats) and len(chats) >= 40
    zh_chats = [c for c in chats if CHINESE.search(c[0]["value"])]
    assert 15 <= len(zh_chats) <= len(chats) - 15  # dialogue in both languages
    code_markers = {"python": "def ", "shell": "#!/usr/bin/env bash", "sql": "SELECT ", "json": '"model_type"',
                    "c": "#include <", "rust": "fn "}
    for language, marker in code_markers.items():
        assert any(marker in t for t in texts), language
    assert all(50 <= len(t) <= 1200 and t.count("\n") < 20 for t in texts)  # cheap to tokenize at seq-len 512

    calib = load_calibration(None, None, 0)  # the default seed's calibration slice has every kind
    pool = calib.samples
    assert any(t.startswith("<s>Human: ") and "\n</s><s>Assistant: " in t and t.endswith("\n</s>") for t in pool)
    assert any(t.count("<s>Human: ") == 2 for t in pool)  # multi-turn
    assert any(CHINESE.search(t) and "<s>" not in t for t in pool)
    assert any("def " in t or "SELECT " in t or "#include" in t for t in pool)


def test_default_samples_use_a_short_file_whole_with_a_warning(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("\n\n".join(f"Paragraph {i} of a short calibration text." for i in range(10)) + "\n")
    calib = load_calibration(short, None, 0)
    assert (len(calib.samples), len(calib.held_out)) == (8, 2)
    assert calib.warnings == [f"{short} gives 8 calibration samples after holding out 2 for evaluation, "
                              f"fewer than the default {DEFAULT_SAMPLES}; using those 8"]
    assert load_calibration(short, 8, 0).warnings == []
    with pytest.raises(BadInput, match="gives 8 calibration samples after holding out 2 for evaluation, "
                                       "fewer than --samples 9; lower --samples or add text"):
        load_calibration(short, 9, 0)


def test_options_left_unset_mean_the_default():
    from registry.quantize import QuantizeOptions

    assert QuantizeOptions().samples is None  # a job without `samples`, or with null, takes the default


def test_a_wheel_built_from_the_repository_carries_the_builtin_set(tmp_path):
    pytest.importorskip("setuptools")
    src = tmp_path / "src"  # a copy: a build writes build/ and *.egg-info next to the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("registry", "workers", "migrations"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    [wheel] = (tmp_path / "dist").glob("registry-*.whl")
    with zipfile.ZipFile(wheel) as z:
        packaged = z.read(f"registry/{BUILTIN}")
    assert packaged == resources.files("registry").joinpath(BUILTIN).read_bytes()
