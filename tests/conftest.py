"""Test-suite setup: offline Hugging Face libraries and a fixed, small torch thread count."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import torch  # noqa: E402  (after the environment, so the HF libraries imported by tests see it)

torch.set_num_threads(2)


import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def run_setup(tmp_path_factory) -> dict[str, Path]:
    """A CLI run's inputs: four conversational pairs and tiny models of two families (see tiny_models)."""
    sys.path.insert(0, str(Path(__file__).parent / "scripts"))
    import trainer_worker

    from tiny_models import two_family_run_setup

    return two_family_run_setup(tmp_path_factory.mktemp("cli"), trainer_worker.conversational_records())
