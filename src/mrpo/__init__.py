"""mrpo: Multi-Reference Preference Optimization on the Hugging Face stack.

``mrpo.build_trainer`` (``api.py``) makes a ready ``MRPOTrainer`` from a model, pairs and references; it is imported
on first use, so ``import mrpo`` stays light (no torch, no transformers).
"""

from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("mrpo")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__", "build_trainer"]


def __getattr__(name: str) -> Any:
    if name == "build_trainer":
        from mrpo.api import build_trainer

        return build_trainer
    raise AttributeError(f"module 'mrpo' has no attribute {name!r}")
