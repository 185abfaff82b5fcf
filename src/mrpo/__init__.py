"""mrpo: Multi-Reference Preference Optimization on the Hugging Face stack."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mrpo")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
