"""Packaging: job handlers and migrations live under the registry namespace; the ML stack is an extra."""
from __future__ import annotations

import subprocess
import sys

from conftest import run_cli


def _python(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd)


def test_workers_and_migrations_install_under_registry(tmp_path):
    # From a folder outside the checkout, only the installed names are importable.
    ok = _python("import registry.workers, registry.migrations; from registry.db import MIGRATIONS_DIR; "
                 "print((MIGRATIONS_DIR / 'env.py').is_file())", tmp_path)
    assert ok.returncode == 0 and ok.stdout.strip() == "True", ok.stderr
    for clashing in ("workers", "migrations"):
        proc = _python(f"import {clashing}", tmp_path)
        assert proc.returncode == 1 and "ModuleNotFoundError" in proc.stderr, (clashing, proc.stderr)


# `sys.modules[name] = None` is how Python itself marks a module as not importable: the same ImportError
# a host without the [ml] extra gets, with no change to the installed packages.
WITHOUT_ML = ("import sys\nfor m in ('torch', 'transformers', 'peft'): sys.modules[m] = None\n"
              "sys.argv = ['registry', *sys.argv[1:]]\nfrom registry.cli import main\nmain()\n")


def _registry_without_ml(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_ML, *args], capture_output=True, text=True, cwd=cwd)


def test_catalog_commands_work_without_the_ml_extra(home, tiny_model, tmp_path):
    imported = _registry_without_ml("import", str(tiny_model), "--name", "tiny", cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr
    assert _registry_without_ml("verify", "tiny", cwd=tmp_path).returncode == 0
    assert "tiny" in _registry_without_ml("list", cwd=tmp_path).stdout


def test_ml_commands_name_the_extra_without_it(home, tiny_model, tmp_path):
    from conftest import import_here
    from test_merge import make_peft_adapter

    run_cli("import", str(tiny_model), "--name", "tiny")
    # A request merge accepts (it refuses a bad one before it needs torch: test_merge covers that).
    import_here(make_peft_adapter(tiny_model, tmp_path / "lora"), "lora", base="tiny")
    for args in (["merge", "tiny", "lora"], ["quantize", "tiny"], ["generate", "tiny", "--prompt", "hi"]):
        proc = _registry_without_ml(*args, cwd=tmp_path)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "pip install 'registry[ml]'" in lines[0], (args, proc.stderr)
