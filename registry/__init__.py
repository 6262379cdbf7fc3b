"""registry: a model artifact registry for LLM weights with SHA-256 manifests, lineage and jobs."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import RegistryError

if TYPE_CHECKING:
    from .core import Registry

__version__ = "0.1.0"
__all__ = ["Registry", "RegistryError", "__version__"]


def __getattr__(name: str):
    # Registry is imported on first use: core imports SQLAlchemy (about 0.3 s), which `registry --help` and
    # the SQLite fast reads of list, show and verify --quick (fastread.py) never need.
    if name == "Registry":
        from .core import Registry

        return Registry
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
