"""Where llama.cpp's converter is (vendored, registry/_vendor/llama_cpp) and what it supports, read without
importing it: its modules import torch and a `gguf` package that must never shadow anything in our process."""
from __future__ import annotations

import ast
import functools
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
    """The transformers architectures (config.json "architectures") the converter converts as text models.

    The converter looks a name up in conversion/__init__.py's TEXT_MODEL_MAP and then imports the module that
    registers it (`@ModelBase.register("LlamaForCausalLM", ...)`): a name counts when it is in both, read with
    ast so nothing of the converter is imported.
    """
    package = VENDOR_DIR / "conversion"
    text_map = _text_model_map(package / "__init__.py")
    registered: set[str] = set()
    for module in package.glob("*.py"):
        registered |= _registered_names(ast.parse(module.read_text(encoding="utf-8")))
    return frozenset(text_map & registered)


def _text_model_map(init: Path) -> set[str]:
    for node in ast.parse(init.read_text(encoding="utf-8")).body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
        if isinstance(target, ast.Name) and target.id == "TEXT_MODEL_MAP" and isinstance(node.value, ast.Dict):
            return {k.value for k in node.value.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
    raise RuntimeError(f"{init} has no TEXT_MODEL_MAP: the vendored converter is not the expected one")


def _registered_names(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "register"
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "ModelBase"):
            names |= {a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)}
    return names


def require_llama_cpp():
    """llama-cpp-python (llama.cpp's library), or BadInput saying how to install it."""
    try:
        import llama_cpp
    except (ImportError, OSError) as exc:  # OSError: the compiled library does not load on this machine
        raise BadInput(f"GGUF needs llama.cpp: pip install 'registry[gguf]' (compiles llama.cpp once, about 6 "
                       f"minutes; set CMAKE_ARGS=\"-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF\") ({exc})") from None
    return llama_cpp
