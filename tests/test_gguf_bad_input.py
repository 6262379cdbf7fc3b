"""What `registry convert --to gguf` refuses (issue 12): one-line errors with documented exit codes, nothing
registered, no job queued for what the catalog alone can refuse, no temp files left, and no torch imported for a
refusal. The catalog side of convert runs on both backends in test_gguf_convert.py; these run on SQLite."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import cli_json, import_here, run_cli
from test_startup import imported


def _one_line_error(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def _nothing_made() -> None:
    assert cli_json("list", "--kind", "gguf") == []
    assert [j for j in cli_json("jobs") if j["type"] == "convert"] == []


@pytest.fixture
def sp(home, sp_model_template) -> str:
    import_here(sp_model_template, "tiny")
    return "tiny"


def _variant(template: Path, dest: Path, config: dict | None = None, drop: tuple[str, ...] = ()) -> Path:
    shutil.copytree(template, dest)
    if config:
        data = json.loads((dest / "config.json").read_text())
        (dest / "config.json").write_text(json.dumps({**data, **config}))
    for name in drop:
        (dest / name).unlink()
    return dest


def test_an_adapter_is_refused_before_torch_is_imported(home, sp_model_template, tmp_path):
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                          "base_model_name_or_path": "tiny"}))
    shutil.copy(sp_model_template / "model.safetensors", lora / "adapter_model.safetensors")
    import_here(sp_model_template, "tiny")
    import_here(lora, "my-lora")
    modules, proc = imported(tmp_path, "convert", "my-lora", "--to", "gguf", check=2)
    assert _one_line_error(proc) == ("error: my-lora is an adapter; merge it into its base first (registry merge BASE "
                                     "my-lora), then convert the merged model")
    assert not modules & {"torch", "transformers", "llama_cpp"}, modules & {"torch", "transformers", "llama_cpp"}
    _nothing_made()


@pytest.mark.parametrize("case, config, drop, exit_code, says", [
    ("gptq", {"quantization_config": {"quant_method": "gptq", "bits": 4}}, (), 2,
     "error: odd is GPTQ-quantized; convert the full-precision model it was made from"),
    ("architecture", {"architectures": ["FooForCausalLM"]}, (), 2,
     "error: architecture FooForCausalLM is not supported by llama.cpp's converter"),
    ("no tokenizer.model", None, ("tokenizer.model",), 2, "tokenizer.model"),
    ("no tokenizer", None, ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"), 2, "tokenizer"),
    ("no config.json", None, ("config.json",), 2, "error: odd has no config.json"),
])
def test_sources_the_converter_cannot_take(home, sp_model_template, tmp_path, case, config, drop, exit_code, says):
    import_here(_variant(sp_model_template, tmp_path / "odd", config, drop), "odd")
    modules, proc = imported(tmp_path, "convert", "odd", "--to", "gguf", check=exit_code)
    assert says in _one_line_error(proc)
    assert "torch" not in modules
    _nothing_made()


def test_unknown_outtype_kind_and_a_gguf_source(sp, tmp_path):
    err = _one_line_error(run_cli("convert", "tiny", "--to", "gguf", "--outtype", "q3_k", check=2))
    assert "invalid value for '--outtype': 'q3_k' is not one of" in err and "'q4_k_m'" in err
    err = _one_line_error(run_cli("convert", "tiny", "--to", "onnx", check=2))
    assert "invalid value for '--to': 'onnx'" in err
    err = _one_line_error(run_cli("convert", "tiny", check=2))
    assert err == "error: missing option '--to'. Choose from: gguf; see registry convert --help"
    err = _one_line_error(run_cli("convert", "tiny", "--to", "gguf", "--max-ppl-ratio", "0", check=2))
    assert "--max-ppl-ratio" in err
    err = _one_line_error(run_cli("convert", "nope", "--to", "gguf", check=3))
    assert err == "error: no artifact, tag or digest named 'nope'; see registry list"
    run_cli("tag", "tiny", "taken")
    err = _one_line_error(run_cli("convert", "tiny", "--to", "gguf", "--name", "taken", check=2))
    assert "'taken' is already a tag" in err
    _nothing_made()
    run_cli("convert", "tiny", "--to", "gguf", "--outtype", "q8_0", "--no-eval")
    err = _one_line_error(run_cli("convert", "tiny-gguf-q8_0", "--to", "gguf", check=2))
    assert err == "error: tiny-gguf-q8_0 is already a GGUF file; convert its source instead"


def test_a_corrupt_source_is_refused(sp, home):
    shown = cli_json("show", "tiny")
    sha = next(f["sha256"] for f in shown["file_list"] if f["path"] == "model.safetensors")
    blob = home / "blobs" / "sha256" / sha[:2] / sha
    blob.chmod(0o644)
    with open(blob, "r+b") as f:
        f.seek(100)
        f.write(b"\xff" * 8)
    run_cli("verify", "tiny", check=1)
    err = _one_line_error(run_cli("convert", "tiny", "--to", "gguf", check=1))
    assert err.startswith("error: tiny is corrupt") and "registry repair tiny" in err
    assert cli_json("list", "--kind", "gguf") == []


@pytest.fixture
def small_store_tmp(home):
    """The store's temp area (where conversions write) on a 2 MiB tmpfs; the snapshot of `tiny` made first."""
    run_cli("path", "tiny")
    tmp = home / "tmp"
    tmp.mkdir(exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(tmp)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    yield tmp
    subprocess.run(["umount", "-l", str(tmp)])


def test_a_disk_that_fills_during_conversion(sp, small_store_tmp):
    """The f16 file (2.9 MB) does not fit: exit 1 "disk full", nothing registered, no temp file left."""
    err = _one_line_error(run_cli("convert", "tiny", "--to", "gguf", "--no-eval", check=1))
    assert err.startswith("error: disk full"), err
    assert cli_json("list", "--kind", "gguf") == []
    assert [p.name for p in small_store_tmp.iterdir()] == []
    job = cli_json("jobs")[0]
    assert job["type"] == "convert" and job["state"] == "failed" and "disk full" in job["error"]


def test_a_wrong_pre_tokenizer_fails_the_tokenizer_check(home, qwen_model_template):
    """gpt-2's split rules on a Qwen2-style vocabulary: the file converts and loads, but tokenizes Chinese
    differently; the gate (before any perplexity) fails the job and nothing is registered. Keeping it anyway
    (--allow-tokenizer-mismatch) is tested on the library call in test_gguf_evaluate.py."""
    import_here(qwen_model_template, "qwen")
    err = _one_line_error(run_cli("convert", "qwen", "--to", "gguf", "--pre-tokenizer", "gpt-2", check=1))
    assert "test strings differently from the source's tokenizer (first: " in err
    assert err.endswith("nothing was registered; --allow-tokenizer-mismatch to keep it anyway")
    assert cli_json("list", "--kind", "gguf") == []
    job = cli_json("jobs")[0]
    assert job["state"] == "failed" and "differently from the source's tokenizer" in job["error"]
    err = _one_line_error(run_cli("convert", "qwen", "--to", "gguf", "--pre-tokenizer", "qwen", check=2))
    assert err.startswith("error: unknown --pre-tokenizer 'qwen'; did you mean qwen2")


def test_a_name_this_conversion_cannot_make_is_refused_before_converting(sp):
    """The default name says nothing of --pre-tokenizer, and a name may hold another kind: refused at once."""
    run_cli("convert", "tiny", "--to", "gguf", "--outtype", "q8_0", "--no-eval")
    err = _one_line_error(run_cli("convert", "tiny", "--to", "gguf", "--outtype", "q8_0", "--pre-tokenizer",
                                  "gpt-2", check=2))
    assert err.startswith("error: name 'tiny-gguf-q8_0' is already used by gguf sha256:") and "--name" in err
    err = _one_line_error(run_cli("convert", "tiny", "--to", "gguf", "--name", "tiny", check=2))
    assert err.startswith("error: name 'tiny' is already used by base sha256:")
    assert [j["type"] for j in cli_json("jobs")] == ["convert"]  # only the first one


def test_a_source_transformers_cannot_load_is_refused_before_converting(home, sp_model_template, tmp_path):
    """llama.cpp's converter does not read model_type, transformers does: the evaluation could not run, which is
    said before the conversion; --no-eval converts it."""
    import_here(_variant(sp_model_template, tmp_path / "odd", {"model_type": "foollama"}), "odd")
    err = _one_line_error(run_cli("convert", "odd", "--to", "gguf", check=2))
    assert err.startswith("error: the evaluation cannot load the source with transformers (")
    assert err.endswith("convert it with --no-eval to skip the evaluation")
    assert cli_json("list", "--kind", "gguf") == []
    run_cli("convert", "odd", "--to", "gguf", "--no-eval")
    assert cli_json("list", "--kind", "gguf")[0]["name"] == "odd-gguf-f16"


def test_a_job_stopped_during_the_evaluation_stops_there(sp, home):
    """Cancel (or a lost lease) reaches the evaluation between texts, not after it; nothing is registered."""
    from registry import Registry
    from registry.errors import JobCancelled
    from registry.gguf.convert import convert
    from registry.gguf.options import ConvertOptions
    from registry.progress import NullReporter

    class StopAfterConverting(NullReporter):
        stop, checked = False, 0

        def advance(self, amount: int) -> None:
            self.stop = True  # the first step done is the conversion

        def check(self) -> None:
            if self.stop:
                self.checked += 1
                raise JobCancelled("job 1 was cancelled")

    reporter = StopAfterConverting()
    with pytest.raises(JobCancelled):
        convert(Registry(), "tiny", ConvertOptions(outtype="q8_0"), reporter=reporter)
    assert reporter.checked == 1
    assert cli_json("list", "--kind", "gguf") == []
    assert [p.name for p in (home / "tmp").iterdir()] == []
