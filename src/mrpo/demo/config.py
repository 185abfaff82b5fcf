"""The config of a scripted CPU run (the demo, the studies, the synthetic world), built in one place.

Every scripted run shares the same frame: a float32 policy, references given as ``name -> model``, a constant
learning rate, one log line per step, no evaluation or checkpoints during training, the CPU, no progress bars,
no trackers. Each caller passes what is its own (data, loss, LoRA, hyperparameters); nested sections merge over
the frame's, so a caller overrides single keys.

    config = run_config(
        policy="models/smollm2", references={"init": "models/smollm2", "external": "models/gemma"},
        train="data/train.jsonl", output_dir="runs/x", cache_dir="cache/references",
        loss={"beta": 0.1}, lora={"enabled": True, "r": 8}, training={"learning_rate": 1e-3},
    )
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

from mrpo.config.schema import MRPOConfig

FRAME_TRAINING: Mapping[str, Any] = {
    "lr_scheduler_type": "constant",
    "logging_steps": 1,
    "eval_strategy": "no",
    "save_strategy": "no",
    "use_cpu": True,
    "disable_tqdm": True,
    "report_to": "none",
}


def run_config(
    *,
    policy: str,
    references: Mapping[str, str],
    train: str | os.PathLike,
    output_dir: str | os.PathLike,
    cache_dir: str | os.PathLike,
    eval: str | os.PathLike | None = None,  # noqa: A002 - the config key's name
    data: Mapping[str, Any] | None = None,
    loss: Mapping[str, Any] | None = None,
    lora: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
    quiet_reference_warning: bool = False,
) -> MRPOConfig:
    """A checked ``MRPOConfig`` for a scripted CPU run.

    Args:
        references: name -> model, the initialising reference first.
        quiet_reference_warning: a run whose first reference is not the policy's start on purpose (DPO against
            another model) silences the config's warning about it.
    """
    raw = {
        "policy": {"model": policy, "dtype": "float32"},
        "references": [{"name": name, "model": model} for name, model in references.items()],
        "data": {"train": str(train), "eval": str(eval) if eval is not None else None, **(data or {})},
        "loss": dict(loss or {}),
        "lora": dict(lora or {"enabled": False}),
        "training": {**FRAME_TRAINING, "output_dir": str(output_dir), **(training or {})},
        "cache_dir": str(cache_dir),
    }
    with warnings.catch_warnings():
        if quiet_reference_warning:
            warnings.simplefilter("ignore", UserWarning)
        return MRPOConfig.from_dict(raw)
