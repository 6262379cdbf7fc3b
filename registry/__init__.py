"""registry: a model artifact registry for LLM weights with SHA-256 manifests, lineage and jobs."""
from .core import Registry
from .errors import RegistryError

__version__ = "0.1.0"
__all__ = ["Registry", "RegistryError", "__version__"]
