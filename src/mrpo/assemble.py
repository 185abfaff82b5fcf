"""A ready ``MRPOTrainer`` from a validated config: the one code path behind ``mrpo train`` and ``mrpo.build_trainer``.

Read and tokenize the splits jointly, fill the reference cache (``prepared_split.prepare_split``), seed, build the
policy (loaded from ``policy.model``, or the model object the caller passed), and wire the collator, the metrics and
diagnostics callbacks and the loss into the trainer. What happens around it (claiming the run directory, saving the
config, training, saving the model) is the caller's.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mrpo.config.schema import AutoBool, MRPOConfig
from mrpo.data.pairs import PairSet
from mrpo.fast_path import FastPath, choose_fast_path, use_shared_rows
from mrpo.logprobs import prefix_shared_refusal
from mrpo.models import check_lora_before_precompute, load_policy
from mrpo.prepared_split import PreparedSplit, prepare_split
from mrpo.rundir import DIAGNOSTICS_FILE, METRICS_FILE
from mrpo.splits import Views, load_views, report_overlap

logger = logging.getLogger(__name__)


@dataclass
class AssembledTrainer:
    """The trainer, and what it was built from."""

    trainer: Any
    """The ``trainer.MRPOTrainer``, not yet trained."""
    views: Views
    train: PreparedSplit
    eval: PreparedSplit | None


def assemble_trainer(
    config: MRPOConfig,
    args: Any,
    *,
    policy: Any = None,
    pairs: dict[str, PairSet] | None = None,
    show_progress: bool = True,
) -> AssembledTrainer:
    """The trainer of ``config`` with ``args`` (a ``transformers.TrainingArguments``, used as given).

    ``policy``: a model object to train instead of loading ``policy.model`` (its starting weights must be what
    ``policy.model`` holds: the initialising reference is scored from there). ``pairs``: splits already in memory
    ("train", "eval"), instead of read from ``data.train`` / ``data.eval``.
    """
    from transformers import set_seed

    from mrpo.collator import PreferenceCollator
    from mrpo.diagnostics import DiagnosticsCallback
    from mrpo.trainer import JsonlMetricsCallback, MRPOTrainer

    pairs = pairs or {}
    fast = choose_fast_path(config.policy, cuda=args.device.type == "cuda")
    shared_setting = config.policy.prefix_shared
    config = dataclasses.replace(config, policy=fast.apply(config.policy))  # "auto" resolved for all below
    check_lora_before_precompute(config)
    views = load_views(config)
    train = prepare_split(config, "train", views, show_progress=show_progress, pairs=pairs.get("train"))
    held_out = None
    if config.data.eval is not None:
        held_out = prepare_split(config, "eval", views, show_progress=show_progress, pairs=pairs.get("eval"))
        report_overlap(config, held_out.tokenization.pair_ids, train.tokenization.pair_ids)

    # Seed before the model is built: LoRA adapters are initialised from the global RNG, whose state otherwise
    # depends on whatever ran earlier in the process (a model conversion, a previous run).
    set_seed(args.seed)
    model = load_policy(config, model=policy)
    fast = _rows_for_model(fast, shared_setting, model)
    logger.info(fast.text())
    output_dir = Path(args.output_dir)
    callbacks: list[Any] = [JsonlMetricsCallback(output_dir / METRICS_FILE)]
    if config.diagnostics.enabled:
        callbacks.append(
            DiagnosticsCallback(
                output_dir / DIAGNOSTICS_FILE,
                config.diagnostics,
                [reference.name for reference in config.references],
                (train.dataset.reference_chosen_logps, train.dataset.reference_rejected_logps),
            )
        )
    trainer = MRPOTrainer(
        model=model,
        args=args,
        train_dataset=train.dataset,
        eval_dataset=held_out.dataset if held_out else None,
        data_collator=PreferenceCollator(
            pad_token_id=views.policy.pad_token_id,
            padding_side=views.policy.padding_side,
            pad_to_multiple_of=config.policy.pad_to_multiple_of,
            padding_free=fast.rows == "packed",
            micro_batch_tokens=config.policy.micro_batch_tokens,
            prefix_shared=fast.rows == "prefix_shared",
            bucket=fast.bucket,
        ),
        processing_class=views.policy.tokenizer,
        loss=config.loss,
        callbacks=callbacks,
    )
    if held_out is not None:
        _label_evaluation_bar(trainer, len(held_out.dataset))
    return AssembledTrainer(trainer, views, train, held_out)


def _rows_for_model(fast: FastPath, setting: AutoBool, model) -> FastPath:
    """The fast path's rows for the loaded policy: padded instead of prefix-shared where the model cannot take
    their mask (an error when ``policy.prefix_shared`` is true)."""
    if fast.rows != "prefix_shared":
        return fast
    refusal = prefix_shared_refusal(model)
    if use_shared_rows(setting, True, refusal, key="policy.prefix_shared"):
        return fast
    return fast.padded_instead(refusal)


def _label_evaluation_bar(trainer, pairs: int) -> None:
    """The Trainer's unlabelled evaluation bar, replaced by one that names the split, the model and the pairs."""
    from transformers.trainer_callback import ProgressCallback

    from mrpo.trainer import HeldOutProgressCallback

    if trainer.pop_callback(ProgressCallback) is not None:  # absent with disable_tqdm or in a notebook
        trainer.add_callback(HeldOutProgressCallback(pairs))
