"""`registry convert REF --to gguf` end to end (issue 12): GGUF artifacts with lineage, metadata and evaluation, the
same digest twice, jobs run by a worker and submitted through `registry serve`. Every test that takes `home` runs
on SQLite and on PostgreSQL (conftest.BOTH_BACKENDS). The converter's and the gate's details are tested without a
catalog in test_gguf_converter.py and test_gguf_evaluate.py."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import cli_json, import_here, run_cli
from serving import make_token, serve_in_thread


@pytest.fixture
def sp(home, sp_model_template) -> str:
    """The SentencePiece model registered as `tiny`."""
    import_here(sp_model_template, "tiny")
    return "tiny"


def test_convert_f16_registers_a_gguf_with_lineage(sp):
    proc = run_cli("convert", "tiny", "--to", "gguf", "--no-eval", "--json")
    assert proc.stderr == ""  # a SentencePiece model with its tokenizer.model: nothing to warn about
    out = json.loads(proc.stdout)
    assert (out["name"], out["outtype"], out["files"], out["created"]) == ("tiny-gguf-f16", "f16", 1, True)
    shown = cli_json("show", "tiny-gguf-f16")
    assert shown["kind"] == "gguf" and shown["status"] == "ready"
    assert [(p["name"], p["role"]) for p in shown["lineage"]["parents"]] == [("tiny", "base")]
    assert [f["path"] for f in shown["file_list"]] == ["tiny.F16.gguf"]
    g = shown["metadata"]["gguf"]
    assert (g["architecture"], g["file_type"], g["outtype"], g["tokenizer_model"]) == ("llama", 1, "f16", "llama")
    assert (g["bos_token_id"], g["eos_token_id"], g["bos_token"], g["eos_token"]) == (1, 2, "<s>", "</s>")
    assert g["name"] == "tiny" and g["context_length"] == 256 and g["block_count"] == 2
    assert shown["metadata"]["model_type"] == "llama"
    conversion = shown["provenance"]["conversion"]
    assert conversion["converter"]["llama_cpp_python"] == "0.3.36" and conversion["outtype"] == "f16"
    assert conversion["source_digest"] == cli_json("show", "tiny")["digest"]
    assert conversion["tokenizer"]["model"] == "sentencepiece" and conversion["warnings"] == []
    text = run_cli("show", "tiny-gguf-f16").stdout
    assert "gguf:            f16 llama, context 256" in text and "derived from: tiny (base, " in text
    assert cli_json("list", "--kind", "gguf")[0]["name"] == "tiny-gguf-f16"


# The evaluation through the command, on SQLite: the catalog side of convert runs on both backends above.
@pytest.mark.sqlite_only
def test_convert_evaluates_the_gguf_against_its_source(sp):
    """Converted first without the evaluation, then with it: the same file, and the evaluation is kept."""
    first = json.loads(run_cli("convert", "tiny", "--to", "gguf", "--outtype", "q8_0", "--no-eval", "--json").stdout)
    assert "evaluation" not in cli_json("show", "tiny-gguf-q8_0")["provenance"]
    out = run_cli("convert", "tiny", "--to", "gguf", "--outtype", "q8_0").stdout.splitlines()
    assert out[0].startswith("converted tiny into tiny-gguf-q8_0 sha256:") and "GGUF q8_0" in out[0]
    assert out[1].startswith("tokenizer: ") and " strings tokenized as the source does; greedy: " in out[1]
    assert cli_json("show", "tiny-gguf-q8_0")["digest"] == first["digest"]
    e = cli_json("show", "tiny-gguf-q8_0")["provenance"]["evaluation"]
    assert e["tokenizer"]["mismatches"] == 0 and e["tokenizer"]["strings"] >= 100
    assert abs(e["perplexity_ratio"] - 1) < 0.05 and e["max_logit_diff"] < 0.1
    assert e["size_quantized"] < e["size_source"] / 3  # 8-bit of float32
    text = run_cli("show", "tiny-gguf-q8_0").stdout
    assert "tokenizer check: " in text and "evaluation:      perplexity " in text


def test_k_quant_and_q8_are_real_and_load(sp):
    """q4_k_m holds Q4_K tensors (hidden 256: every row is whole blocks) and llama.cpp loads both files. As the
    library call the command's job makes (the command itself: the test above)."""
    import llama_cpp

    from registry import Registry
    from registry.gguf.convert import convert
    from registry.gguf.options import ConvertOptions

    reg = Registry()
    for outtype in ("q4_k_m", "q8_0"):
        result = convert(reg, "tiny", ConvertOptions(outtype=outtype, evaluate=False))
        assert result.evaluation is None and result.name == f"tiny-gguf-{outtype}"
    assert sorted(a["name"] for a in cli_json("list", "--kind", "gguf")) == ["tiny-gguf-q4_k_m", "tiny-gguf-q8_0"]
    for name, file_type, main_type in (("tiny-gguf-q4_k_m", 15, "Q4_K"), ("tiny-gguf-q8_0", 7, "Q8_0")):
        shown = cli_json("show", name)
        g = shown["metadata"]["gguf"]
        assert g["file_type"] == file_type and g["tensor_types"][main_type] >= 8, g["tensor_types"]
        assert "evaluation" not in shown["provenance"] and shown["provenance"]["conversion"]["evaluated"] is False
        path = Path(run_cli("path", name).stdout.strip()) / g["file"]
        llm = llama_cpp.Llama(str(path), n_ctx=64, verbose=False)
        assert llm.n_vocab() == 512
        llm.close()


def test_same_source_and_options_give_the_same_digest(sp):
    first = json.loads(run_cli("convert", "tiny", "--to", "gguf", "--outtype", "q4_k_m", "--no-eval",
                               "--json").stdout)
    run_cli("rm", "tiny-gguf-q4_k_m")
    run_cli("gc")
    again = json.loads(run_cli("convert", "tiny", "--to", "gguf", "--outtype", "q4_k_m", "--no-eval",
                               "--name", "tiny-q4", "--json").stdout)
    assert again["digest"] == first["digest"] and again["name"] == "tiny-q4" and again["created"]


def test_detached_convert_runs_in_a_worker(sp, home):
    out = run_cli("convert", "tiny", "--to", "gguf", "--outtype", "q8_0", "--no-eval", "--detach", "--json")
    job = json.loads(out.stdout)["job"]
    assert cli_json("job", str(job))["state"] == "queued"
    run_cli("worker", "--once")
    done = cli_json("job", str(job))
    assert done["state"] == "succeeded" and done["type"] == "convert"
    assert done["result"]["name"] == "tiny-gguf-q8_0" and done["result"]["outtype"] == "q8_0"
    assert not any((home / "tmp").glob("convert-*"))  # the scratch folder went with the job


def test_convert_through_the_catalog_server(sp):
    """POST /v1/jobs and the CLI with REGISTRY_URL queue the same job; the server's worker runs it."""
    import httpx

    from registry import Registry

    reg = Registry()
    with serve_in_thread(reg) as url:
        token = make_token(reg, "write", "ci")
        headers = {"Authorization": f"Bearer {token}"}
        bad = httpx.post(f"{url}/v1/jobs", headers=headers,
                         json={"type": "convert", "ref": "tiny", "outtype": "q3_k"})
        assert bad.status_code == 422
        bad = httpx.post(f"{url}/v1/jobs", headers=headers, json={"type": "convert", "ref": "tiny", "pre_tokenizer": "qwen"})
        assert bad.status_code == 422 and bad.json()["error"]["message"].startswith(
            "unknown --pre-tokenizer 'qwen'; did you mean qwen2")
        r = httpx.post(f"{url}/v1/jobs", headers=headers,
                       json={"type": "convert", "ref": "tiny", "outtype": "q8_0", "evaluate": False})
        assert r.status_code == 202 and r.json()["created"] is True
        env = {"REGISTRY_URL": url, "REGISTRY_TOKEN": token, "REGISTRY_HOME": "/nonexistent"}
        out = run_cli("convert", "tiny", "--to", "gguf", "--outtype", "q8_0", "--no-eval", "--detach", "--json",
                      env=env)
        assert json.loads(out.stdout)["job"] == r.json()["job"]  # one request, one job
        refused = run_cli("convert", "nope", "--to", "gguf", env=env, check=3)
        assert refused.stderr.startswith("error: no artifact, tag or digest named 'nope'")
    run_cli("worker", "--once")
    assert cli_json("show", "tiny-gguf-q8_0")["kind"] == "gguf"
    events = cli_json("show", "tiny-gguf-q8_0")["events"]
    assert events[0]["kind"] == "registered"


def test_gguf_files_imported_or_pulled_are_gguf_artifacts(home, sp_f16, sp_q8_0, sp_model_template, tmp_path):
    """A folder whose weights are .gguf files (one downloaded from the Hub, a Hub GGUF repo pulled whole) is
    registered as kind gguf with its header's facts, without --kind; pull takes the same path (read_metadata)."""
    one = tmp_path / "one"
    (one / "q8").mkdir(parents=True)
    shutil.copy(sp_q8_0.path, one / "q8" / "tiny.Q8_0.gguf")
    (one / "README.md").write_text("# tiny, 8-bit\n")
    out = cli_json("import", str(one), "--name", "local-q8")
    assert out["kind"] == "gguf"
    shown = cli_json("show", "local-q8")
    g = shown["metadata"]["gguf"]
    assert (g["file"], g["outtype"], g["architecture"], g["tokenizer_model"]) == ("q8/tiny.Q8_0.gguf", "q8_0",
                                                                                  "llama", "llama")
    assert shown["metadata"]["parameter_count"] == g["parameter_count"] > 0
    assert "gguf:            q8_0 llama, context 256" in run_cli("show", "local-q8").stdout
    assert run_cli("generate", "local-q8", "--prompt", "模型", "--max-new-tokens", "4").stdout.strip()
    # export --ollama: the artifact's files as they are, and a Modelfile whose FROM names the GGUF among them.
    run_cli("export", "local-q8", str(tmp_path / "ollama"), "--ollama")
    assert (tmp_path / "ollama" / "q8" / "tiny.Q8_0.gguf").read_bytes() == sp_q8_0.path.read_bytes()
    assert "FROM ./q8/tiny.Q8_0.gguf\n" in (tmp_path / "ollama" / "Modelfile").read_text()
    assert (tmp_path / "ollama" / "README.md").is_file()

    # Every quantization of a model in one folder: a gguf artifact that names its files; generate needs one.
    several = tmp_path / "several"
    several.mkdir()
    shutil.copy(sp_f16.path, several / "tiny.F16.gguf")
    shutil.copy(sp_q8_0.path, several / "tiny.Q8_0.gguf")
    assert cli_json("import", str(several), "--name", "tiny-ggufs")["kind"] == "gguf"
    g = cli_json("show", "tiny-ggufs")["metadata"]["gguf"]
    assert g == {"files": {"tiny.F16.gguf": "f16", "tiny.Q8_0.gguf": "q8_0"}}
    assert "gguf:            2 files: tiny.F16.gguf (f16), tiny.Q8_0.gguf (q8_0)" in run_cli("show", "tiny-ggufs").stdout
    refused = run_cli("generate", "tiny-ggufs", "--prompt", "hi", check=2)
    assert refused.stderr == ("error: tiny-ggufs holds 2 GGUF files (tiny.F16.gguf, tiny.Q8_0.gguf); register the one "
                              "to run on its own: registry import a folder that holds only that file\n")
    assert run_cli("export", "tiny-ggufs", str(tmp_path / "out"), "--ollama", check=2).stderr == refused.stderr
    assert not (tmp_path / "out").exists()
    from registry.gguf.run import several_ggufs  # pulled: the hint names the repo and a runnable file's tail

    files = ["mmproj-model-f16.gguf", "qwen2-7b-instruct-q4_k_m.gguf", "qwen2-7b-instruct-q8_0.gguf"]
    assert several_ggufs("q", files, "Qwen/Qwen2-7B-Instruct-GGUF").endswith(
        ": registry pull Qwen/Qwen2-7B-Instruct-GGUF --include '*qwen2-7b-instruct-q4_k_m.gguf' --name NAME")

    # GGUF weights are kind gguf whatever --kind says; a GGUF beside safetensors is a file of a base model (not
    # read); a truncated GGUF is refused with its path, and nothing is registered.
    (several / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {"bits": 4}}))
    proc = run_cli("import", str(several), "--name", "as-base", "--kind", "base", check=2)
    assert proc.stderr == (f"error: {several} holds GGUF weights only, which are kind gguf, not base; "
                           "leave out --kind base\n")
    assert cli_json("import", str(several), "--name", "with-config")["kind"] == "gguf"  # not quantized
    mixed = tmp_path / "mixed"
    shutil.copytree(sp_model_template, mixed)
    (mixed / "old.gguf").write_bytes(b"GGUF" + (1).to_bytes(4, "little"))  # a GGUF v1: not read
    mixed_out = cli_json("import", str(mixed), "--name", "mixed")
    assert mixed_out["kind"] == "base" and "gguf" not in cli_json("show", "mixed")["metadata"]
    damaged = tmp_path / "damaged"
    (damaged / "q8").mkdir(parents=True)
    (damaged / "q8" / "model.gguf").write_bytes(sp_q8_0.path.read_bytes()[:1_000_000])  # a download cut short
    proc = run_cli("import", str(damaged), "--name", "damaged", check=2)
    assert proc.stderr == (f"error: q8/model.gguf is truncated: its tensors end at byte "
                           f"{sp_q8_0.path.stat().st_size:,} but the file has 1,000,000 bytes; download it again\n")
    assert sorted(a["name"] for a in cli_json("list")) == ["local-q8", "mixed", "tiny-ggufs", "with-config"]


# The pull side on SQLite: pull registers through the same read_metadata as import (both backends above).
@pytest.mark.sqlite_only
def test_a_gguf_repo_pulled_from_an_hf_endpoint(home, sp_f16, sp_q8_0, tmp_path):
    """A registry's catalog is an HF endpoint: pulling a repo of two GGUF files whole gives an artifact that lists
    them; pulling one with --include gives one that runs. Its web page offers the files, not a transformers load."""
    import httpx

    from registry import Registry

    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(sp_f16.path, repo / "tiny.F16.gguf")
    shutil.copy(sp_q8_0.path, repo / "tiny.Q8_0.gguf")
    (repo / "README.md").write_text("# tiny GGUFs\n")
    import_here(repo, "acme/tiny-GGUF")
    other = {"REGISTRY_HOME": str(tmp_path / "home2"), "HF_HOME": str(tmp_path / "hf-home"), "HF_TOKEN": "",
             "REGISTRY_URL": ""}
    with serve_in_thread(Registry(), anonymous=True) as url:
        page = httpx.get(f"{url}/models/acme/tiny-GGUF").text
        assert 'class="gguf"' not in page and "snapshot_download(&#39;acme/tiny-GGUF&#39;)" in page
        whole = json.loads(run_cli("pull", "acme/tiny-GGUF", "--endpoint", url, "--json", env=other).stdout)
        one = json.loads(run_cli("pull", "acme/tiny-GGUF", "--endpoint", url, "--include", "*Q8_0.gguf", "--name",
                                 "tiny-q8", "--json", env=other).stdout)
    assert (whole["kind"], one["kind"]) == ("gguf", "gguf")
    shown = json.loads(run_cli("show", whole["name"], "--json", env=other).stdout)
    assert shown["metadata"]["gguf"] == {"files": {"tiny.F16.gguf": "f16", "tiny.Q8_0.gguf": "q8_0"}}
    refused = run_cli("generate", whole["name"], "--prompt", "hi", env=other, check=2)
    assert refused.stderr.endswith(f": registry pull acme/tiny-GGUF --endpoint {url} --include '*F16.gguf' "
                                   "--name NAME\n")
    g = json.loads(run_cli("show", "tiny-q8", "--json", env=other).stdout)["metadata"]["gguf"]
    assert (g["file"], g["outtype"]) == ("tiny.Q8_0.gguf", "q8_0")
    assert run_cli("generate", "tiny-q8", "--prompt", "模型", "--max-new-tokens", "4", env=other).stdout.strip()
