"""The CLI as a new user meets it: one-line errors for every kind of bad input, help with examples, a README
that lists every option, --json on every read command, and what cancel says about a finished job (issue 9)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest

from conftest import cli_json, import_here, run_cli
from test_lineage import make_adapter

ROOT = Path(__file__).resolve().parent.parent


def _one_error_line(proc) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


# --- usage errors, bare `registry`, database URLs ---

def test_bare_registry_prints_the_help_and_exits_0(home):
    proc = run_cli(check=0)
    assert proc.stdout.startswith("Usage: registry [OPTIONS] COMMAND") and "Commands:" in proc.stdout
    assert proc.stderr == ""


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "error: no such option '--bogus'; see registry --help"),
    (["nocmd"], "error: no such command 'nocmd'; see registry --help"),
    (["lst"], "error: no such command 'lst' (did you mean 'list'?); see registry --help"),
    (["--home"], "error: option '--home' requires an argument; see registry --help"),
    (["list", "--kind"], "error: option '--kind' requires an argument; see registry list --help"),
    (["show", "x", "--bogus"], "error: no such option '--bogus'; see registry show --help"),
    (["tag", "x"], "error: missing argument 'TAG'; see registry tag --help"),
    (["list", "--kind", "weird"], "error: invalid value for '--kind': 'weird' is not one of"),
    (["jobs", "--limit", "x"], "error: invalid value for '--limit': 'x' is not a valid integer; see registry jobs "),
    (["jobs", "--limit", "-1"], "error: invalid value for '--limit': -1 is not in the range x>=1"),
    (["job", "abc"], "error: invalid value for 'JOB_ID': 'abc' is not a valid integer; see registry job --help"),
    (["job", "99999999999999999999"], "error: invalid value for 'JOB_ID': 99999999999999999999 is not in the"),
    (["cancel", "0"], "error: invalid value for 'JOB_ID': 0 is not in the range"),
    (["worker", "--lease", "0"], "error: invalid value for '--lease': 0.0 is not in the range x>=1"),
    (["worker", "--poll", "-1"], "error: invalid value for '--poll': -1.0 is not in the range x>0"),
    (["quantize", "x", "--max-ppl-ratio", "-1"], "error: invalid value for '--max-ppl-ratio': -1.0 is not in"),
    (["generate", "x", "--prompt", " "], "error: --prompt is empty"),
])
def test_usage_errors_are_one_line_with_exit_2(home, args, message):
    proc = run_cli(*args, check=2, timeout=60)  # a bad value accepted would run a worker for ever
    assert _one_error_line(proc).startswith(message) and proc.stdout == ""


@pytest.mark.parametrize("url, says", [
    ("nonsense", "is not a database URL we can use"),
    ("foo://bar", "is not a database URL we can use"),
    ("postgresql://:x:", "is not a database URL we can use"),  # a port that is not a number: ValueError
    ("postgresql+psycopg://u@[::1/x", "is not a database URL we can use"),
    ("mysql://u@db-host/registry", "needs the MySQLdb driver, which is not installed"),
])
def test_malformed_database_url_is_one_line_exit_2(home, url, says):
    line = _one_error_line(run_cli("--database-url", url, "list", check=2))
    assert repr(url) in line and says in line and "postgresql+psycopg://user@host/registry" in line


def test_unreachable_postgresql_is_one_fast_line_naming_host_and_remedy(home):
    started = time.monotonic()
    proc = run_cli("--database-url", "postgresql+psycopg://u:pw@127.0.0.1:1/x", "list", check=1, timeout=60)
    assert time.monotonic() - started < 8
    line = _one_error_line(proc)
    assert "127.0.0.1:1/x" in line and ":pw@" not in line
    assert "check that the server is up and reachable" in line


def test_postgresql_refusing_the_login_says_to_check_the_url(home):
    line = _one_error_line(run_cli("--database-url", "postgresql+psycopg://no_such_role@127.0.0.1:5432/x", "list",
                                   check=1, timeout=60))
    assert 'role "no_such_role" does not exist' in line and "check the user, password and database name" in line


# --- obvious bad input to commands that touch the catalog: one line, documented code (both backends) ---

def test_bad_input_to_commands_is_one_line(db_url, tiny_model, tmp_path):
    import_here(tiny_model, "tiny")
    (tmp_path / "a-file").write_text("x")
    line = _one_error_line(run_cli("export", "tiny", str(tmp_path / "a-file" / "out"), check=2))
    assert "cannot create" in line and "a parent is not a folder" in line
    line = _one_error_line(run_cli("export", "tiny", "/proc/registry-export", check=2))
    assert "cannot create /proc/registry-export" in line
    assert _one_error_line(run_cli("job", "999", check=3)) == "error: no job 999; see registry jobs"
    assert _one_error_line(run_cli("cancel", "999", check=3)) == "error: no job 999; see registry jobs"


def test_quantize_group_size_zero_is_bad_input(reg, tiny_model):
    """Was a ZeroDivisionError. Checked on the library's refusal path (the CLI's takes ~15 s to import GPTQModel)."""
    from registry.catalog import load
    from registry.errors import BadInput
    from registry.importer import import_folder
    from registry.quantize import QuantizeOptions, check_source

    import_folder(reg, tiny_model, "tiny")
    with reg.session() as s, pytest.raises(BadInput, match="--group-size 0 is not valid; use a positive divisor"):
        check_source(load(s, "tiny"), {}, QuantizeOptions(group_size=0))


# --- help texts and the README's commands block ---

def _commands():
    from registry.cli import cli

    return cli, sorted(cli.commands.items())


def _help(cli, name, command) -> str:
    parent = click.Context(cli, info_name="registry")
    return command.get_help(click.Context(command, info_name=name, parent=parent))


def _readme_commands_block() -> dict[str, str]:
    """README's commands block as {command: its lines joined}; '' holds the global options line."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```sh\n(registry \[--home DIR\].*?)```", readme, re.S).group(1)
    entries: dict[str, str] = {}
    current = None
    for line in block.splitlines():
        if line.startswith("registry "):
            word = line.split()[1]
            current = "" if word.startswith("[") else word
            entries[current] = entries.get(current, "") + " " + line
        elif line.startswith(" ") and current is not None:
            entries[current] += " " + line
    return entries


def _option_names(command) -> list[list[str]]:
    return [[o for o in p.opts + p.secondary_opts if o.startswith("--")] for p in command.params
            if isinstance(p, click.Option) and not p.hidden and p.name != "help"]


def _mentions(text: str, option: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) is not None


def test_every_command_help_has_examples():
    cli, commands = _commands()
    for name, command in commands:
        text = _help(cli, name, command)
        examples = text.split("\n  Examples:\n", 1)
        assert len(examples) == 2, f"registry {name} --help has no Examples section"
        first = examples[1].splitlines()[0]
        assert first.startswith("    ") and "registry " in first, f"registry {name}: {first!r}"


def test_readme_commands_block_lists_every_command_and_option():
    cli, commands = _commands()
    block = _readme_commands_block()
    for names in _option_names(cli):
        assert any(_mentions(block[""], n) for n in names), f"README lacks global option {names}"
    for name, command in commands:
        assert name in block, f"README's commands block has no `registry {name}` line"
        for names in _option_names(command):
            assert all(_mentions(block[name], n) for n in names), f"README lacks registry {name} {names}"


def test_every_read_command_takes_json():
    cli, _ = _commands()
    for name in ("list", "show", "manifest", "path", "jobs", "job", "verify", "fsck", "gc", "cancel", "init",
                 "import", "pull", "repair", "merge", "quantize"):
        assert any(p.name == "as_json" for p in cli.commands[name].params), name


# --- --json of path and manifest; what cancel says ---

def test_path_and_manifest_json_and_what_cancel_says(db_url, tiny_model):
    imported = cli_json("import", str(tiny_model), "--name", "tiny")
    digest, done = imported["digest"], imported["job"]
    data = cli_json("path", "tiny")
    assert data == {"ref": "tiny", "digest": digest, "path": run_cli("path", "tiny").stdout.strip()}
    assert (Path(data["path"]) / "config.json").is_file()
    m = cli_json("manifest", "tiny")
    assert set(m) == {"digest", "manifest", "metadata", "provenance"} and m["digest"] == digest
    # cancel of a finished job leaves it alone, says so and exits 0 (the job is not running either way)
    assert run_cli("cancel", str(done)).stdout == f"job {done} already succeeded; nothing to cancel\n"
    assert cli_json("cancel", str(done)) == {"job": done, "state": "succeeded", "cancelled": False}
    queued = cli_json("import", str(tiny_model), "--name", "again", "--detach")["job"]
    assert cli_json("cancel", str(queued)) == {"job": queued, "state": "cancelled", "cancelled": True}
    assert run_cli("cancel", str(queued)).stdout == f"job {queued} already cancelled; nothing to cancel\n"


def test_cancel_of_a_queued_job_says_it_was_cancelled(home, tiny_model):
    queued = cli_json("import", str(tiny_model), "--name", "tiny", "--detach")["job"]
    assert run_cli("cancel", str(queued)).stdout == f"job {queued} cancelled before it ran\n"


# --- show renders nested metadata readably ---

PEFT_CONFIG = {  # as peft writes it: many unset fields, long module lists
    "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": "tiny", "bias": "none",
    "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "layer_replication": None,
    "layers_pattern": None, "layers_to_transform": None, "loftq_config": {}, "lora_alpha": 8, "lora_dropout": 0.05,
    "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None, "peft_type": "LORA", "r": 4,
    "rank_pattern": {"model.layers.0.self_attn.q_proj": 8}, "revision": None,
    "target_modules": ["q_proj", "v_proj"] + [f"model.layers.{i}.self_attn.k_proj" for i in range(8)],
    "task_type": "CAUSAL_LM", "use_dora": False, "use_rslora": False,
}


def test_show_prints_peft_config_as_indented_lines(db_url, tiny_model, tmp_path):
    import_here(tiny_model, "tiny")
    adapter = make_adapter(tmp_path / "lora", "tiny")
    (adapter / "adapter_config.json").write_text(json.dumps(PEFT_CONFIG))
    import_here(adapter, "lora")
    out = run_cli("show", "lora").stdout.splitlines()
    assert max(len(line) for line in out) <= 100, max(out, key=len)
    i = out.index("peft_config:")
    section = [line for line in out[i + 1:i + 40] if line.startswith("  ")]
    assert "  r:                       4" in section and "  use_rslora:              false" in section
    assert "  rank_pattern:" in section and "    model.layers.0.self_attn.q_proj: 8" in section
    modules = next(n for n, line in enumerate(section) if line.startswith("  target_modules:"))
    assert section[modules].split(":", 1)[1].split()[:2] == ["q_proj,", "v_proj,"]
    assert section[modules + 1].startswith(" " * 27 + "model.layers.")  # wrapped under the value
    assert not any("megatron_config" in line or "null" in line for line in out)  # unset fields left out
    assert cli_json("show", "lora")["metadata"]["peft_config"] == PEFT_CONFIG  # --json keeps every field


# --- make demo with an absolute VENV ---

def test_make_demo_manifest_check_works_with_absolute_paths(home, tiny_model, tmp_path):
    venv = Path(sys.executable).parent.parent.absolute()
    dry = subprocess.run(["make", "-n", "-C", str(ROOT), "-o", f"{venv}/bin/registry", "demo", f"VENV={venv}",
                          f"DEMO_HOME={home}"], capture_output=True, text=True, check=True).stdout
    line = next(x for x in dry.splitlines() if x.startswith("cd demo-export"))
    # What the demo's earlier lines leave behind, made here without building a model or loading transformers.
    import_here(tiny_model, "tiny-llama")
    run_cli("export", "tiny-llama", str(tmp_path / "demo-export"))
    proc = subprocess.run(["bash", "-c", f"set -o pipefail; {line}"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "config.json: OK" in proc.stdout and "FAILED" not in proc.stdout
