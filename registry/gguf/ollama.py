"""`registry export REF DIR --ollama`: the GGUF file and a Modelfile, so that `ollama create NAME -f DIR/Modelfile`
makes an Ollama model of it.

The Modelfile's TEMPLATE is Ollama's Go-template form of the GGUF's chat template: the jinja template is
rendered with placeholder messages (with and without a system message, and with an answer) and the rendered
text is cut around the placeholders into `{{ if .System }}...{{ end }}...{{ .Prompt }}...{{ .Response }}...`.
Ollama renders that template once per turn of a conversation and cuts the last one at `{{ .Response }}`.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..core import Registry
from ..errors import BadInput, DiskFull
from .run import LLAMA_CHINESE_PROMPT, gguf_artifact, render_chat_template

# Placeholders no chat template contains; each is found again in the rendered text.
SYSTEM, USER, ANSWER = "\x01SYSTEM\x01", "\x01USER\x01", "\x01ANSWER\x01"
# Ollama's own default is 0.8; a little lower keeps a small model on topic. Users change it in the Modelfile.
TEMPERATURE = 0.7
MAX_NUM_CTX = 131072  # Ollama allocates the whole context up front: a 1M-token model would not start


def _go_literal(text: str) -> str:
    """Literal text inside a Go template in a Modelfile's triple-quoted TEMPLATE. `{{` would open an action; and
    Ollama's parser ends the string at the first three double quotes before a line end, so no two quotes may
    stand together: both are written as Go string actions (`{{ "{{" }}`, `{{ "\\x22\\x22" }}`)."""
    out = text.replace("{{", "\x02")
    out = re.sub(r'"{2,}', lambda m: "{{ \"" + "\\x22" * len(m.group(0)) + "\" }}", out)
    return out.replace("\x02", '{{ "{{" }}')


class _Turns:
    """The chat template's text around one user turn (and an optional system turn) and its answer."""

    def __init__(self, gguf_meta: dict[str, Any]):
        self.meta = gguf_meta
        bos = gguf_meta.get("bos_token") or ""
        # llama.cpp (under Ollama) adds the BOS itself when the GGUF says so; a "<s>" the template writes first
        # would be a second one. A template that starts every turn with one keeps it at the end of each answer
        # (turn_end), where it starts the next turn.
        self.bos = bos if bos and gguf_meta.get("add_bos_token", True) else ""

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        text = render_chat_template(self.meta, messages, add_generation_prompt)
        return text[len(self.bos):] if self.bos and text.startswith(self.bos) else text

    def split(self) -> tuple[str, str, str, str, str]:
        """(prefix, after_prompt, before_answer, after_answer, turn_end): the template writes one turn without a
        system message as `prefix + PROMPT + after_prompt` to ask for an answer, and as `prefix + PROMPT +
        after_prompt + before_answer + ANSWER + after_answer` once answered (Llama-2 adds a space before the
        answer); `turn_end + prefix` is what it writes between an answer and the next prompt."""
        user = [{"role": "user", "content": USER}]
        plain = self.render(user, True)
        if plain.count(USER) != 1:
            raise BadInput("the GGUF's chat template does not show a user message once; write the Modelfile's "
                           "TEMPLATE yourself")
        prefix, after_prompt = plain.split(USER)
        answered = self.render(user + [{"role": "assistant", "content": ANSWER}], False)
        after_answer, before_answer = "", ""
        if answered.count(ANSWER) == 1 and answered.count(USER) == 1:
            between, after_answer = answered.split(USER, 1)[1].split(ANSWER)
            if between.startswith(after_prompt):
                before_answer = between[len(after_prompt):]
        turn_end = after_answer
        second = self.render(user + [{"role": "assistant", "content": ANSWER}, {"role": "user", "content": SYSTEM}],
                             True)
        if second.count(ANSWER) == 1 and second.count(SYSTEM) == 1:
            between = second[second.index(ANSWER) + len(ANSWER):second.index(SYSTEM)]
            if between.endswith(prefix):  # else the first turn differs (a default system message): keep after_answer
                turn_end = between[:len(between) - len(prefix)]
        return prefix, after_prompt, before_answer, after_answer, turn_end

    def prefix_template(self, prefix: str, after_prompt: str) -> str:
        """The user prefix as a Go template, with `{{ if .System }}` where a system message changes it."""
        try:
            with_system = self.render([{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}],
                                      True)
        except BadInput:  # templates that refuse a system role ("Only user and assistant roles are supported")
            return _go_literal(prefix)
        if with_system.count(SYSTEM) != 1 or with_system.count(USER) != 1 or \
                not with_system.endswith(USER + after_prompt):
            return _go_literal(prefix)  # the template ignores a system message, or moves the user turn
        before = with_system[:with_system.index(USER)]
        at = before.index(SYSTEM)
        after_system = len(before) - at - len(SYSTEM)
        # The longest common start and end of the two prefixes, never into the system text: what lies between
        # them is the system part, and in the plain prefix whatever default the template writes instead.
        start = 0
        while start < min(len(prefix), at) and prefix[start] == before[start]:
            start += 1
        end = 0
        while end < min(len(prefix), after_system) and prefix[-1 - end] == before[-1 - end]:
            end += 1
        if start + end >= len(prefix):
            # The system part is only inserted; any cut in [len(prefix) - end, start] gives the same text: take
            # the first that falls between turn markers (ChatML's `{{ if .System }}<|im_start|>system...`).
            cuts = range(len(prefix) - end, start + 1)
            cut = next((k for k in cuts if k == 0 or prefix[k - 1] in ">\n]"), cuts[0])
            head, default, tail = prefix[:cut], "", prefix[cut:]
            system = before[cut:cut + len(before) - len(prefix)]
        else:
            head, default, tail = prefix[:start], prefix[start:len(prefix) - end], prefix[len(prefix) - end:]
            system = before[start:len(before) - end]
        sys_head, sys_tail = system.split(SYSTEM)
        branch = "{{ if .System }}" + _go_literal(sys_head) + "{{ .System }}" + _go_literal(sys_tail)
        branch += ("{{ else }}" + _go_literal(default) if default else "") + "{{ end }}"
        return _go_literal(head) + branch + _go_literal(tail)


def _marker(text: str) -> str:
    """The turn marker a text starts with: its first special-looking token (`<|im_start|>`, `[INST]`), else its
    first line without surrounding space (`Human:`)."""
    text = text.strip()
    found = re.match(r"<\|?[^<>\s|]+\|?>|\[[A-Z_/]+\]", text)
    return found.group(0) if found else text.split("\n", 1)[0].strip()


def template_and_stops(gguf_meta: dict[str, Any]) -> tuple[str, list[str]]:
    """The Ollama TEMPLATE and the stop strings of a GGUF's chat format."""
    eos = gguf_meta.get("eos_token") or ""
    if not gguf_meta.get("chat_template"):
        # Llama-Chinese, as `registry generate --chat`: "<s>Human: {prompt}\n</s><s>Assistant: ". The format has
        # no system turn; its BOS moves behind each answer (see _Turns) so that history turns keep theirs.
        head, tail = LLAMA_CHINESE_PROMPT.split("{prompt}")
        bos = "<s>" if gguf_meta.get("bos_token") == "<s>" and gguf_meta.get("add_bos_token", True) else ""
        head = head[len(bos):] if bos else head
        template = _go_literal(head) + "{{ .Prompt }}" + _go_literal(tail) + "{{ .Response }}" + \
            _go_literal("\n</s>" + bos)
        return template, _unique([eos or "</s>", "</s>", _marker(head)])
    turns = _Turns(gguf_meta)
    prefix, after_prompt, before_answer, after_answer, turn_end = turns.split()
    template = turns.prefix_template(prefix, after_prompt) + "{{ .Prompt }}" + _go_literal(after_prompt)
    if before_answer:  # Ollama cuts the last turn at {{ .Response }}: this shows only in earlier turns
        template += "{{ if .Response }}" + _go_literal(before_answer) + "{{ end }}"
    template += "{{ .Response }}" + _go_literal(turn_end)
    return template, _unique([eos, _marker(after_answer), _marker(prefix)])


def _unique(items: list[str]) -> list[str]:
    out: list[str] = []
    for item in items:
        if item and item not in out:
            out.append(item)
    return out


def _quoted(value: str) -> str | None:
    """A one-line Modelfile value in double quotes, or None where Ollama's parser cannot read it back: it has no
    escapes, drops unprintable characters, ends a value at a line end, and takes three double quotes for the
    start of a multi-line string."""
    if not value or not value.isprintable() or value.startswith('"'):
        return None
    return f'"{value}"'


def modelfile(gguf_meta: dict[str, Any], gguf_file: str) -> str:
    """The Modelfile text for the GGUF file `gguf_file` (beside it), per Ollama's Modelfile grammar."""
    template, stops = template_and_stops(gguf_meta)
    source = f"./{gguf_file}"
    if _quoted(source) is None:
        raise BadInput(f"cannot name {gguf_file!r} in a Modelfile; export the artifact under a plain file name")
    plain = re.fullmatch(r"[^\s\"#]+", source) is not None
    lines = ["# Made by `registry export --ollama`; make the Ollama model with: ollama create NAME -f Modelfile",
             f"FROM {source if plain else _quoted(source)}",
             f'TEMPLATE """{template}"""']
    ctx = gguf_meta.get("context_length")
    if isinstance(ctx, int) and ctx > 0:
        lines.append(f"PARAMETER num_ctx {min(ctx, MAX_NUM_CTX)}")
    lines.append(f"PARAMETER temperature {TEMPERATURE}")
    lines += [f"PARAMETER stop {_quoted(stop)}" for stop in stops if _quoted(stop) is not None]
    return "\n".join(lines) + "\n"


def export_ollama(reg: Registry, ref: str | int, dest: str | os.PathLike, copy: bool = False) -> Path:
    """DEST/<file>.gguf (reflink, hardlink or copy, as export does) and DEST/Modelfile; DEST must be new or an
    empty folder, and nothing is left on failure."""
    from ..export import export_artifact

    # The artifact's other files (a README, a config.json from the Hub) are exported too: FROM names the GGUF.
    name, artifact_id, gguf_meta, gguf_name, paths = gguf_artifact(reg, ref)
    text = modelfile(gguf_meta, gguf_name)  # a template that does not convert fails before anything is written
    dest = Path(dest).absolute()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BadInput(f"{dest} already exists and is not an empty folder; choose a new folder")
    was_there = dest.exists()
    # export_artifact builds the folder beside DEST and renames it into place; the Modelfile is written into
    # that finished folder through a temporary name, and the whole folder goes again if that fails.
    export_artifact(reg, artifact_id, dest, copy)
    try:
        fd, tmp = tempfile.mkstemp(dir=dest, prefix=".Modelfile.")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, dest / "Modelfile")
    except BaseException as exc:
        shutil.rmtree(dest, ignore_errors=True)
        if was_there:
            dest.mkdir(exist_ok=True)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise DiskFull(f"disk full while writing {dest / 'Modelfile'}; free space and try again") from None
        raise
    return dest


def _umask() -> int:
    from ..store import current_umask

    return current_umask()
