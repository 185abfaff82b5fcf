"""Test-suite setup: offline Hugging Face libraries and a fixed, small torch thread count."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import torch  # noqa: E402  (after the environment, so the HF libraries imported by tests see it)

torch.set_num_threads(2)
