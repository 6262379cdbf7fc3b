"""The optional ML stack (torch, transformers, peft): only merge, quantize and generate need it."""
from __future__ import annotations

import importlib.util

from .errors import BadInput

ML_PACKAGES = ("torch", "transformers", "peft")


def require_ml(command: str) -> None:
    """Refuse with the extra to install when the ML packages are missing (a catalog-only install)."""
    missing = [p for p in ML_PACKAGES if _missing(p)]
    if missing:
        raise BadInput(f"registry {command} needs {', '.join(missing)}, which are not installed: "
                       "pip install 'registry[ml]' (or 'registry[gptq]' for quantize)")


def _missing(package: str) -> bool:
    import sys

    if package in sys.modules:  # None there means an import was blocked
        return sys.modules[package] is None
    return importlib.util.find_spec(package) is None
