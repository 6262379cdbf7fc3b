"""`registry export REF DIR --ollama` and GGUF artifacts in the catalog server (issue 12).

The Modelfile is read back with a port of Ollama's own Modelfile parser (parser/parser.go ParseFile: commands,
`#` comments, values that are plain, "quoted" or \"\"\"multi-line\"\"\", ending at a line end once their quotes
close) and its TEMPLATE is executed with a small evaluator of the Go template subset it uses, the way Ollama runs a
template without .Messages (template.go: once per turn with .System/.Prompt/.Response, the last turn cut at
{{ .Response }}): what comes out must be what the chat template itself renders.

The catalog here is SQLite only: export and the server's routes read the catalog as for any artifact (both
backends in test_serve_*.py), and GGUF registration runs on both in test_gguf_convert.py.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import httpx
import pytest

from conftest import cli_json, run_cli
from serving import serve_in_thread

pytest.importorskip("llama_cpp")

CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ '<s>System: ' + m['content'] + '\\n</s>' }}"
                 "{% elif m['role'] == 'user' %}{{ '<s>Human: ' + m['content'] + '\\n</s>' }}"
                 "{% else %}{{ '<s>Assistant: ' + m['content'] + '\\n</s>' }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<s>Assistant: ' }}{% endif %}")

# Chat templates as models ship them (abridged where they handle tools), with (bos_token, eos_token).
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>'"
          " + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
QWEN2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system"
         "\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + "
         "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
         "{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
          "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}"
          "{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
          "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
          "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
          "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
          "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
          "{% endfor %}")
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
          "{% endif %}")
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
           "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
           "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
ZEPHYR = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\\n' + message['content'] + "
          "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\\n' + message['content'] + eos_token }}"
          "\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\\n'  + message['content'] + eos_token }}\n"
          "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")
# Literal "{{" and runs of quotes: both would break the Modelfile or the Go template if written as they are.
AWKWARD = ("{% for m in messages %}{{ '{{' + m['role'] + '}} \"\"\"' + m['content'] + '\"\"\"\\n' }}{% endfor %}"
           "{% if add_generation_prompt %}{{ '{{assistant}} \"\"\"' }}{% endif %}")
TEMPLATES = {"chatml": (CHATML, "", "<|im_end|>", ["<|im_end|>", "<|im_start|>"]),
             "qwen2": (QWEN2, "", "<|endoftext|>", ["<|endoftext|>", "<|im_end|>", "<|im_start|>"]),
             "llama2": (LLAMA2, "<s>", "</s>", ["</s>", "[INST]"]),
             "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>", ["<|eot_id|>", "<|start_header_id|>"]),
             "mistral": (MISTRAL, "<s>", "</s>", ["</s>", "[INST]"]),
             "zephyr": (ZEPHYR, "<s>", "</s>", ["</s>", "<|user|>"]),
             "awkward": (AWKWARD, "<s>", "</s>", ["</s>", '{{user}} """'])}


# -- Ollama's Modelfile grammar (parser/parser.go) ---------------------------------------------------------------

COMMANDS = {"from", "license", "template", "system", "adapter", "draft", "renderer", "parser", "parameter",
            "message", "requires"}


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(command, argument) pairs as Ollama's ParseFile reads them ("model" for FROM, the parameter's name for
    PARAMETER); ValueError where it would fail."""
    nil, name, value, parameter, message, comment = range(6)
    commands: list[tuple[str, str]] = []
    state, buf, command, role = nil, "", "", ""

    def unquote(s: str) -> tuple[str, bool]:
        if s[:3] == '"""':
            return (s[3:-3], True) if len(s) >= 6 and s.endswith('"""') else ("", False)
        if s[:1] == '"':
            return (s[1:-1], True) if len(s) >= 2 and s.endswith('"') else ("", False)
        return s, True

    def step(r: str, cs: int) -> tuple[int, str]:
        if cs == nil:
            return (comment, "") if r == "#" else (nil, "") if r in " \t\r\n" else (name, r)
        if cs == name:
            if r.isascii() and r.isalpha():
                return name, r
            if r in " \t":
                return value, ""
            raise ValueError("command must be one of ...")
        if cs == value:
            return (nil, r) if r in " \t\r\n" else (value, r)
        if cs in (parameter, message):
            if r.isascii() and (r.isalnum() if cs == parameter else r.isalpha()) or (cs == parameter and r == "_"):
                return cs, r
            if r in " \t":
                return value, ""
            raise ValueError("unexpected EOF")
        return (nil, "") if r in "\r\n" else (comment, "")

    for r in text:
        nxt, r = step(r, state)
        if nxt != state:
            if state == name:
                if buf.lower() not in COMMANDS:
                    raise ValueError(f"invalid command {buf!r}")
                command = "model" if buf.lower() == "from" else buf.lower()
                nxt = {"parameter": parameter, "message": message}.get(buf.lower(), nxt)
            elif state in (parameter, message):
                if state == parameter:
                    command = buf
                else:
                    role = buf
            elif state == value:
                s, ok = unquote(buf.strip())
                if not ok or r in " \t":
                    buf += r
                    continue
                commands.append((command, f"{role}: {s}" if role else s))
                role = ""
            buf, state = "", nxt
        if r and r.isprintable():
            buf += r
    if state == value:
        s, ok = unquote(buf.strip())
        if not ok:
            raise ValueError("unexpected EOF")
        commands.append((command, s))
    elif state not in (nil, comment):
        raise ValueError("unexpected EOF")
    if not any(c == "model" for c, _ in commands):
        raise ValueError("no FROM line")
    return commands


# -- the Go template subset the TEMPLATE uses, run as Ollama runs a template without .Messages ------------------

ACTION = re.compile(r"\{\{(.*?)\}\}", re.S)


def check_go_template(template: str) -> None:
    """Every `{{` opens an action that `}}` closes; if/else/end nest; only actions the subset knows."""
    parts = ACTION.split(template)
    assert not any("{{" in text for text in parts[::2]), "an unclosed {{"
    depth = 0
    for action in (a.strip() for a in parts[1::2]):
        if action.startswith("if "):
            depth += 1
        elif action in ("else", "end"):
            assert depth > 0, f"{{{{ {action} }}}} without if"
            depth -= action == "end"
        else:
            assert re.fullmatch(r'\.(System|Prompt|Response)|"(?:[^"\\]|\\.)*"', action), action
    assert depth == 0, "an if without end"


def go_render(template: str, values: dict[str, str], last: bool = False) -> str:
    """The template with .System/.Prompt/.Response; `last`: cut at {{ .Response }} (Ollama's last turn)."""
    parts = ACTION.split(template)
    out: list[str] = []
    frames: list[list[bool]] = []  # [showing, condition]
    for i, part in enumerate(parts):
        showing = all(f[0] for f in frames)
        if i % 2 == 0:
            out.append(part if showing else "")
            continue
        action = part.strip()
        if action.startswith("if "):
            cond = bool(values.get(action[3:].strip().lstrip("."), ""))
            frames.append([cond, cond])
        elif action == "else":
            frames[-1][0] = not frames[-1][1]
        elif action == "end":
            frames.pop()
        elif action.startswith("."):
            if showing:
                out.append(values.get(action[1:], ""))
            if last and action == ".Response":
                break
        elif showing:
            out.append(ast.literal_eval(action))  # a Go string literal: "{{", "\x22\x22"
    return "".join(out)


def ollama_prompt(template: str, turns: list[tuple[str, str]], system: str = "") -> str:
    """What Ollama sends llama.cpp for a conversation: (prompt, answer) turns, the last answer still to come."""
    text = ""
    for i, (prompt, answer) in enumerate(turns):
        last = i == len(turns) - 1
        text += go_render(template, {"System": system if i == 0 else "", "Prompt": prompt,
                                     "Response": "" if last else answer}, last=last)
    return text


def jinja_prompt(meta: dict, turns: list[tuple[str, str]], system: str = "") -> str:
    """The same conversation rendered by the chat template itself, less the BOS llama.cpp adds."""
    from registry.gguf.run import render_chat_template

    messages = [{"role": "system", "content": system}] if system else []
    for prompt, answer in turns:
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    text = render_chat_template(meta, messages[:-1], add_generation_prompt=True)
    bos = meta.get("bos_token") or ""
    return text[len(bos):] if bos and text.startswith(bos) else text


def template_of(commands: list[tuple[str, str]]) -> str:
    templates = [arg for c, arg in commands if c == "template"]
    assert len(templates) == 1
    return templates[0]


TURNS = [("你好", "你好！有什么可以帮你？"), ("What is GGUF?", "A file format."), ("谢谢", "")]


@pytest.mark.parametrize("kind", sorted(TEMPLATES))
def test_modelfile_template_renders_what_the_chat_template_renders(kind):
    from registry.gguf.ollama import modelfile

    template, bos, eos, stops = TEMPLATES[kind]
    meta = {"chat_template": template, "bos_token": bos, "eos_token": eos, "add_bos_token": bool(bos),
            "context_length": 4096}
    commands = parse_modelfile(modelfile(meta, "m.Q4_K_M.gguf"))
    assert commands[0] == ("model", "./m.Q4_K_M.gguf")
    go = template_of(commands)
    check_go_template(go)
    assert [arg for c, arg in commands if c == "stop"] == stops
    assert ("num_ctx", "4096") in commands and ("temperature", "0.7") in commands
    # Qwen2 writes its default system message once; Ollama's legacy mode (no .Messages) repeats it every turn.
    turns = TURNS[:1] if kind == "qwen2" else TURNS
    assert ollama_prompt(go, turns) == jinja_prompt(meta, turns)
    if kind != "mistral":  # Mistral's template refuses a system message
        assert "{{ if .System }}" in go
        assert ollama_prompt(go, turns, system="简短回答。") == jinja_prompt(meta, turns, system="简短回答。")
    else:
        assert ".System" not in go


def test_modelfile_without_a_chat_template_uses_the_llama_chinese_format():
    from registry.gguf.ollama import modelfile

    meta = {"chat_template": None, "bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True,
            "context_length": 256}
    commands = parse_modelfile(modelfile(meta, "tiny.F16.gguf"))
    go = template_of(commands)
    check_go_template(go)
    # <s>Human: {prompt}\n</s><s>Assistant: , the first <s> being the BOS llama.cpp adds; each later turn keeps its own.
    assert ollama_prompt(go, TURNS) == ("Human: 你好\n</s><s>Assistant: 你好！有什么可以帮你？\n</s>"
                                        "<s>Human: What is GGUF?\n</s><s>Assistant: A file format.\n</s>"
                                        "<s>Human: 谢谢\n</s><s>Assistant: ")
    assert [arg for c, arg in commands if c == "stop"] == ["</s>", "Human:"]
    assert ("num_ctx", "256") in commands


# -- export --ollama of registered GGUF artifacts ---------------------------------------------------------------

@pytest.fixture(scope="module")
def ggufs(tmp_path_factory, sp_model_template):
    """A registry home (SQLite) with `tiny` and its `tiny-gguf-f16` (no chat template), and `chat-gguf-f16`
    (CHAT_TEMPLATE, with a system role)."""
    from registry import Registry
    from registry.db import dispose_all
    from registry.gguf.convert import convert
    from registry.gguf.options import ConvertOptions
    from registry.importer import import_folder

    root = tmp_path_factory.mktemp("gguf-export")
    chat_source = root / "chat"
    shutil.copytree(sp_model_template, chat_source)
    config = json.loads((chat_source / "tokenizer_config.json").read_text())
    (chat_source / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
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


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_export_ollama_writes_the_gguf_and_a_modelfile(ggufs, tmp_path):
    from registry.gguf.run import chat_prompt

    dest = tmp_path / "out" / "chat-ollama"
    proc = run_cli("export", "chat-gguf-f16", str(dest), "--ollama")
    assert proc.stdout == f"{dest}\n"
    assert proc.stderr == f"make the Ollama model with: ollama create NAME -f {dest / 'Modelfile'}\n"
    shown = cli_json("show", "chat-gguf-f16")
    [file] = shown["file_list"]
    assert sorted(p.name for p in dest.iterdir()) == ["Modelfile", file["path"]]
    commands = parse_modelfile((dest / "Modelfile").read_text(encoding="utf-8"))
    [source] = [arg for c, arg in commands if c == "model"]
    assert (dest / source).resolve() == (dest / file["path"]).resolve() and (dest / source).is_file()
    assert sha256(dest / source) == file["sha256"]
    go = template_of(commands)
    check_go_template(go)
    meta = shown["metadata"]["gguf"]
    assert meta["chat_template"] == CHAT_TEMPLATE
    assert ollama_prompt(go, [("你好", "")]) == chat_prompt(meta, "你好").removeprefix("<s>")
    assert ollama_prompt(go, TURNS, system="简短回答。") == jinja_prompt(meta, TURNS, system="简短回答。")
    params = [(c, arg) for c, arg in commands if c not in ("model", "template")]
    assert params == [("num_ctx", "256"), ("temperature", "0.7"), ("stop", "</s>"), ("stop", "Human:")]
    assert not list(dest.parent.glob(".*"))  # no partial folder or temporary Modelfile left beside it


def test_export_ollama_copy_and_an_empty_destination(ggufs, tmp_path):
    dest = tmp_path / "empty"
    dest.mkdir()
    run_cli("export", "tiny-gguf-f16", str(dest), "--ollama", "--copy")
    gguf = dest / "tiny.F16.gguf"
    assert gguf.stat().st_nlink == 1 and os.access(gguf, os.W_OK)  # its own file, not the store's blob
    commands = parse_modelfile((dest / "Modelfile").read_text(encoding="utf-8"))
    assert commands[0] == ("model", "./tiny.F16.gguf")
    assert "Human: {{ .Prompt }}" in template_of(commands)


def test_export_ollama_bad_inputs_leave_nothing(ggufs, tmp_path):
    proc = run_cli("export", "tiny", str(tmp_path / "a"), "--ollama", check=2)
    assert proc.stderr == ("error: tiny is a base model, not a GGUF file; convert it first: "
                           "registry convert tiny --to gguf\n")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    proc = run_cli("export", "tiny-gguf-f16", str(busy), "--ollama", check=2)
    assert "already exists and is not an empty folder" in proc.stderr
    run_cli("export", "no-such", str(tmp_path / "b"), "--ollama", check=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]


# -- the catalog server ----------------------------------------------------------------------------------------

def test_web_page_shows_gguf_facts_and_a_download_link_that_downloads_the_file(ggufs):
    shown = cli_json("show", "chat-gguf-f16")
    [file] = shown["file_list"]
    with serve_in_thread(ggufs, anonymous=True) as url:
        page = httpx.get(f"{url}/models/chat-gguf-f16")
        assert page.status_code == 200
        html = page.text
        link = re.search(r'<a class="download mono" href="([^"]+)" download="([^"]+)">', html)
        assert link and link.group(2) == file["path"]
        assert link.group(1) == f"/chat-gguf-f16/resolve/{shown['digest'][7:47]}/{file['path']}"
        for fact in ("<dd class=\"gguf-outtype\">f16</dd>", "<dd class=\"gguf-architecture\">llama</dd>",
                     "<dd class=\"gguf-context\">256 tokens</dd>", "F16 ×16, F32 ×5"):
            assert fact in html
        assert f"hf download chat-gguf-f16 {file['path']} --local-dir chat-gguf-f16" in html
        assert "ollama create chat-gguf-f16" in html and "llama-cli -m chat-gguf-f16/" in html
        # The Modelfile export --ollama writes (TEMPLATE, stop strings), not a bare FROM.
        assert "cat &gt; chat-gguf-f16/Modelfile &lt;&lt;&#39;EOF&#39;" in html and "TEMPLATE &#34;&#34;&#34;" in html
        got = httpx.get(url + link.group(1))
        assert got.status_code == 200 and hashlib.sha256(got.content).hexdigest() == file["sha256"]
        # A model without a chat template says which format --chat uses.
        assert "Llama-Chinese format" in httpx.get(f"{url}/models/tiny-gguf-f16").text


def test_huggingface_hub_downloads_the_gguf_and_reads_its_gguf_info(ggufs, tmp_path):
    from huggingface_hub import HfApi, hf_hub_download

    shown = cli_json("show", "chat-gguf-f16")
    [file] = shown["file_list"]
    meta = shown["metadata"]["gguf"]
    with serve_in_thread(ggufs, anonymous=True) as url:
        path = hf_hub_download("chat-gguf-f16", file["path"], endpoint=url, cache_dir=tmp_path / "hf", token=False)
        assert sha256(Path(path)) == file["sha256"]
        info = HfApi(endpoint=url, token=False).model_info("chat-gguf-f16")
        assert info.gguf == {"total": meta["parameter_count"], "architecture": "llama", "context_length": 256,
                             "chat_template": CHAT_TEMPLATE, "bos_token": "<s>", "eos_token": "</s>"}
        assert "gguf" in info.tags and info.library_name == "gguf"  # as the Hub labels GGUF repos
        assert HfApi(endpoint=url, token=False).model_info("tiny").gguf is None  # only GGUF artifacts have one
