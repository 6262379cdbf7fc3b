"""`registry generate` on GGUF artifacts (issue 12): llama.cpp streams greedy text, `--chat` uses the GGUF's chat
template or the Llama-Chinese format, and none of it needs torch.

The catalog here is SQLite only: what these tests add on top of a catalog lookup is llama.cpp, and the GGUF
artifacts' registration runs on both backends in test_gguf_convert.py. The GGUF files are made once for the
module with registry.gguf.convert (without the evaluation, which test_gguf_convert.py and
test_gguf_evaluate.py check); expected text comes from llama-cpp-python's own create_completion.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest

from conftest import run_cli

llama_cpp = pytest.importorskip("llama_cpp")

# A Llama-Chinese style template, as Chinese chat models ship it in tokenizer_config.json.
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ '<s>System: ' + m['content'] + '\\n</s>' }}"
                 "{% elif m['role'] == 'user' %}{{ '<s>Human: ' + m['content'] + '\\n</s>' }}"
                 "{% else %}{{ '<s>Assistant: ' + m['content'] + '\\n</s>' }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<s>Assistant: ' }}{% endif %}")
PROMPT = "你好，请介绍一下你自己。"


def with_chat_template(template_dir: Path, dest: Path, template: str) -> Path:
    """A copy of a model folder whose tokenizer_config.json carries `template` (the converter writes it into the
    GGUF as tokenizer.chat_template)."""
    shutil.copytree(template_dir, dest)
    config = json.loads((dest / "tokenizer_config.json").read_text())
    (dest / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    return dest


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory, sp_model_template):
    """A registry home (SQLite) with `tiny-gguf-f16` (no chat template) and `chat-gguf-f16` (CHAT_TEMPLATE), and
    the environment that points the CLI at it."""
    from registry import Registry
    from registry.db import dispose_all
    from registry.gguf.convert import convert
    from registry.gguf.options import ConvertOptions
    from registry.importer import import_folder

    root = tmp_path_factory.mktemp("gguf-generate")
    chat_source = with_chat_template(sp_model_template, root / "chat", CHAT_TEMPLATE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REGISTRY_HOME", str(root / "home"))
        mp.delenv("REGISTRY_DATABASE_URL", raising=False)
        reg = Registry()
        reg.init()
        for name, folder in (("tiny", sp_model_template), ("chat", chat_source)):
            import_folder(reg, folder, name)
            convert(reg, name, ConvertOptions(evaluate=False))
        yield reg
        dispose_all()


def gguf_of(reg, name: str) -> tuple[dict, Path]:
    from registry.gguf.run import gguf_file

    _, meta, path = gguf_file(reg, name)
    return meta, path


def expected_text(path: Path, prompt: str | list[int], max_tokens: int) -> str:
    """llama-cpp-python's own greedy completion, decoded as generate decodes (undecodable bytes as U+FFFD;
    create_completion drops them, so they are compared without)."""
    with closing(llama_cpp.Llama(str(path), n_ctx=256, verbose=False)) as llm:
        out = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, top_k=1, repeat_penalty=1.0)
    return out["choices"][0]["text"]


def vocab(path: Path):
    """The GGUF's tokenizer in llama.cpp, closed after use (its __del__ at exit can print a traceback)."""
    return closing(llama_cpp.Llama(str(path), vocab_only=True, verbose=False))


def test_generate_streams_llama_cpp_greedy_text(ggufs):
    _, path = gguf_of(ggufs, "tiny-gguf-f16")
    proc = run_cli("generate", "tiny-gguf-f16", "--prompt", PROMPT, "--max-new-tokens", "12")
    assert proc.stderr == ""
    assert proc.stdout.endswith("\n") and proc.stdout[:-1].strip()
    assert proc.stdout[:-1].replace("\ufffd", "") == expected_text(path, PROMPT, 12)
    # In the library, the same text arrives in several pieces, one or more tokens each.
    from registry.gguf.run import generate

    pieces = list(generate(ggufs, "tiny-gguf-f16", PROMPT, max_new_tokens=12))
    assert len(pieces) > 1 and "".join(pieces) == proc.stdout[:-1]


def test_streamed_pieces_are_whole_characters(ggufs):
    """A character the vocabulary lacks is byte tokens (SentencePiece byte fallback); each piece that comes out
    holds whole characters, and together they are the text."""
    from registry.gguf.run import text_pieces

    _, path = gguf_of(ggufs, "tiny-gguf-f16")
    text = "龘齉 模型 🙂 café"
    with vocab(path) as llm:
        tokens = llm.tokenize(text.encode(), add_bos=False, special=False)
        pieces = list(text_pieces(llm, tokens))
    assert len(tokens) > len(text)  # bytes, not characters: 龘 alone is three tokens
    assert "".join(pieces).strip() == text
    assert not any("\ufffd" in p for p in pieces)
    assert len(pieces) > 3


def test_chat_without_template_uses_the_llama_chinese_format(ggufs):
    from registry.gguf.run import chat_prompt, prompt_tokens

    meta, path = gguf_of(ggufs, "tiny-gguf-f16")
    assert meta["chat_template"] is None
    text = chat_prompt(meta, PROMPT)
    assert text == f"<s>Human: {PROMPT}\n</s><s>Assistant: "
    with vocab(path) as llm:
        tokens = prompt_tokens(llm, text)
        bos, eos = llm.token_bos(), llm.token_eos()
    # "<s>" is the BOS token (twice, as the format says), never doubled at the start and never its characters.
    assert tokens[0] == bos and tokens[1] != bos
    assert tokens.count(bos) == 2 and tokens.count(eos) == 1
    proc = run_cli("generate", "tiny-gguf-f16", "--prompt", PROMPT, "--chat", "--max-new-tokens", "10")
    assert proc.stdout[:-1].replace("\ufffd", "") == expected_text(path, tokens, 10)


def test_chat_uses_the_gguf_chat_template_as_transformers_renders_it(ggufs, sp_model_template, tmp_path):
    from transformers import AutoTokenizer

    from registry.gguf.run import chat_prompt, prompt_tokens

    meta, path = gguf_of(ggufs, "chat-gguf-f16")
    assert meta["chat_template"] == CHAT_TEMPLATE
    source = with_chat_template(sp_model_template, tmp_path / "chat", CHAT_TEMPLATE)
    messages = [{"role": "user", "content": PROMPT}]
    expected = AutoTokenizer.from_pretrained(source).apply_chat_template(messages, tokenize=False,
                                                                        add_generation_prompt=True)
    assert chat_prompt(meta, PROMPT) == expected == f"<s>Human: {PROMPT}\n</s><s>Assistant: "
    with vocab(path) as llm:
        tokens = prompt_tokens(llm, expected)
    proc = run_cli("generate", "chat-gguf-f16", "--prompt", PROMPT, "--chat", "--max-new-tokens", "10")
    assert proc.stdout[:-1].replace("\ufffd", "") == expected_text(path, tokens, 10)


def test_chat_template_runs_sandboxed():
    """A chat template comes with a downloaded model: it cannot reach Python internals."""
    from registry.errors import BadInput
    from registry.gguf.run import chat_prompt

    hostile = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(BadInput, match="chat template does not render"):
        chat_prompt({"chat_template": hostile}, "hi")
    failing = "{{ raise_exception('Only user and assistant roles are supported!') }}"
    with pytest.raises(BadInput, match="Only user and assistant roles are supported!"):
        chat_prompt({"chat_template": failing}, "hi")


def test_gguf_generate_needs_no_torch(ggufs):
    """torch and transformers made unimportable: a GGUF still generates (and the same text)."""
    script = ("import sys; sys.modules['torch'] = sys.modules['transformers'] = None; "
              "from registry.cli import main; sys.argv = ['registry'] + sys.argv[1:]; main()")
    args = ["generate", "tiny-gguf-f16", "--prompt", PROMPT, "--max-new-tokens", "12"]
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    _, path = gguf_of(ggufs, "tiny-gguf-f16")
    assert proc.stdout[:-1].replace("\ufffd", "") == expected_text(path, PROMPT, 12)
    # ... and a plain model still says what it needs.
    import_proc = subprocess.run([sys.executable, "-c", script, "generate", "tiny", "--prompt", "hi"],
                                 capture_output=True, text=True)
    assert import_proc.returncode == 2
    assert "needs torch, transformers, which are not installed: pip install 'registry[ml]'" in import_proc.stderr


def test_without_llama_cpp_it_says_what_to_install(ggufs):
    script = ("import sys; sys.modules['llama_cpp'] = None; "
              "from registry.cli import main; sys.argv = ['registry'] + sys.argv[1:]; main()")
    proc = subprocess.run([sys.executable, "-c", script, "generate", "tiny-gguf-f16", "--prompt", "hi"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: GGUF needs llama.cpp: pip install 'registry[gguf]'")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_bad_generate_requests(ggufs):
    if llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this llama.cpp build offloads to a GPU: --device cuda is valid here")
    proc = run_cli("generate", "tiny-gguf-f16", "--prompt", "hi", "--device", "cuda", check=2)
    assert proc.stdout == ""
    assert proc.stderr.startswith("error: --device cuda: this llama-cpp-python was built for the CPU only; "
                                  "reinstall it with CMAKE_ARGS=\"-DGGML_CUDA=on\"")
    too_long = " ".join(["registry"] * 300)  # the tiny model's context is 256 tokens
    proc = run_cli("generate", "tiny-gguf-f16", "--prompt", too_long, check=2)
    assert "takes at most 256 (its context length)" in proc.stderr and proc.stdout == ""
    proc = run_cli("generate", "no-such-gguf", "--prompt", "hi", check=3)
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
