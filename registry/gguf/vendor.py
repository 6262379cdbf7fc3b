"""Where llama.cpp's converter is (vendored, registry/_vendor/llama_cpp) and what it supports, read without
importing it: its modules import torch and a `gguf` package that must never shadow anything in our process."""
from __future__ import annotations

import ast
import functools
import importlib.util
import tomllib
from pathlib import Path

from ..errors import BadInput

VENDOR_DIR = Path(__file__).resolve().parent.parent / "_vendor" / "llama_cpp"
CONVERTER = VENDOR_DIR / "convert_hf_to_gguf.py"
# The llama-cpp-python release whose sdist the converter was copied from (VENDORED.md); pyproject pins the same.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"


def converter_versions() -> dict:
    """The converter's versions as provenance records them."""
    with open(VENDOR_DIR / "gguf-py" / "pyproject.toml", "rb") as f:
        gguf_py = tomllib.load(f)["project"]["version"]
    return {"llama_cpp_python": LLAMA_CPP_PYTHON_VERSION, "gguf_py": gguf_py}


@functools.cache
def supported_architectures() -> frozenset[str]:
    """The transformers architectures (config.json "architectures") the converter converts as text models: the
    keys of conversion/__init__.py's TEXT_MODEL_MAP, where the converter looks a name up before importing the
    module that registers it (every key is registered there: a test checks it). Read with ast, importing nothing
    of the converter, and only that one file (parsing all 94 modules took up to a second of every convert).
    """
    return frozenset(_text_model_map(VENDOR_DIR / "conversion" / "__init__.py"))


def _text_model_map(init: Path) -> set[str]:
    for node in ast.parse(init.read_text(encoding="utf-8")).body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
        if isinstance(target, ast.Name) and target.id == "TEXT_MODEL_MAP" and isinstance(node.value, ast.Dict):
            return {k.value for k in node.value.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
    raise RuntimeError(f"{init} has no TEXT_MODEL_MAP: the vendored converter is not the expected one")


def require_llama_cpp(load: bool = True):
    """llama-cpp-python (llama.cpp's library), or BadInput saying how to install it. `load=False` only checks
    that it is installed (about 0.3 s less: a conversion without evaluation never loads it in this process)."""
    if not load:
        if importlib.util.find_spec("llama_cpp") is None:
            raise BadInput(f"GGUF needs llama.cpp: {INSTALL_HINT}")
        return None
    try:
        import llama_cpp
    except (ImportError, OSError) as exc:  # OSError: the compiled library does not load on this machine
        raise BadInput(f"GGUF needs llama.cpp: {INSTALL_HINT} ({exc})") from None
    return llama_cpp


INSTALL_HINT = ("pip install 'registry[gguf]' (compiles llama.cpp once, about 6 minutes; set "
                "CMAKE_ARGS=\"-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF\")")
