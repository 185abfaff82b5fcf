"""MRPOTrainer: transformers.Trainer with the MRPO loss on cached references, its metrics and its callbacks.

A step is one policy forward over the batch's chosen and rejected sequences (through ``logprobs.sequence_logps``,
the same function that built the reference cache) and ``losses.mrpo_loss`` against the K cached reference columns
the collator delivers; a batch the collator split under ``policy.micro_batch_tokens`` is a forward and backward per
micro-batch. Whatever K is, no reference model is in memory. The loss maths lives in ``losses.py``; this file wires
it in, accumulates method.md §5's statistics between logging steps and writes them to ``metrics.jsonl``. The live
warnings that watch those statistics are ``diagnostics.py``'s.

MRPOTrainer uses the Trainer's public API, except for the few private parts ``TRAINER_INTERNALS`` lists with the
reason for each; they sit in one marked section of the class, and tests/test_trainer.py fails when transformers
changes one of them.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import has_length

from mrpo.config.schema import LossConfig
from mrpo.errors import ConfigError, TrainingError, write_failure
from mrpo.logprobs import SequenceLogps, packed_sequence_logps, prefix_shared_sequence_logps, sequence_logps
from mrpo.losses import MRPOOutput, NonFiniteLogpsError, check_logps, mrpo_loss, valid_logps
from mrpo.rundir import mean_train_loss

logger = logging.getLogger(__name__)


class MetricAccumulator:
    """Sums of per-pair statistics between two logs, reduced across processes only when logged.

    Keeping sums on the device (not Python floats) and the pair count on the host (a shape, known there) makes
    no host-device sync a step; the single all-reduce happens at logging time, when every process calls
    ``Trainer.log``.
    """

    def __init__(self) -> None:
        self.names: list[str] = []
        self.sums: torch.Tensor | None = None
        self.count = 0

    def add(self, statistics: dict[str, torch.Tensor]) -> None:
        if self.sums is None:
            self.names = list(statistics)
        stacked = torch.stack([statistics[name].float() for name in self.names])  # (M, B)
        sums = stacked.sum(dim=1)
        self.sums = sums if self.sums is None else self.sums + sums
        self.count += stacked.shape[1]

    def pop_means(self, reduce) -> dict[str, float]:
        """Means over every pair seen since the last call, across processes; resets."""
        if self.sums is None:
            return {}
        totals = reduce(torch.cat([self.sums, self.sums.new_tensor([self.count])]))
        means = (totals[:-1] / totals[-1]).tolist()
        self.sums, self.count = None, 0
        return dict(zip(self.names, means, strict=True))


K1_MEANINGLESS_PREFIXES = ("alpha/", "ctro/")
"""Statistics left out of the logs at K = 1: alpha/ref1 is 1 by construction and CTRO has nothing to clip."""


def logged_statistics(output: MRPOOutput) -> dict[str, torch.Tensor]:
    """The per-pair statistics the trainer logs: ``pair_statistics()``, less at K = 1 the figures that would mean
    nothing there (``K1_MEANINGLESS_PREFIXES``). The loss's own API keeps every key whatever K is."""
    statistics = output.pair_statistics()
    if output.num_references > 1:
        return statistics
    return {name: value for name, value in statistics.items() if not name.startswith(K1_MEANINGLESS_PREFIXES)}


def is_evaluation_log(logs: dict[str, Any]) -> bool:
    """Whether ``logs`` is the line ``Trainer.evaluate`` logs: its ``{prefix}_runtime`` and every other key under the
    same prefix. The end-of-training line has ``train_runtime`` too, but also ``total_flos``; a step's has ``loss``."""
    prefixes = [key[: -len("runtime")] for key in logs if key.endswith("_runtime")]
    return any(all(key.startswith(prefix) for key in logs) for prefix in prefixes)


TRAINER_INTERNALS = {
    "_save_checkpoint": "overridden: the one place the Trainer writes a checkpoint (model, optimizer, scheduler, RNG "
    "and state); a full disk or a read-only directory there becomes one line instead of a traceback. No public hook "
    "wraps the write (on_save runs after it).",
    "_track_num_input_tokens": "overridden: the Trainer counts tokens only under include_num_input_tokens_seen, from "
    "the batch's input_ids / attention_mask (a split batch has neither); MRPO always counts the collator's real "
    "tokens (num_tokens, as TRL logs it). Replacing the hook is the only way to keep the Trainer from counting twice.",
    "_prepare_inputs": "called by prediction_step: an evaluation batch goes where the Trainer's training_step puts a "
    "training batch (the device; under DeepSpeed, float tensors in its dtype), as Trainer.prediction_step does.",
    "model_accepts_loss_kwargs": "set to False: transformers 5.17 and 5.18, before the public loss_is_scaled_for_ga "
    "(5.19), decide from it whether to divide the loss by the accumulation steps; drop it once pyproject requires "
    "transformers>=5.19.",
}
"""The private parts of ``transformers.Trainer`` that MRPOTrainer relies on, and why; everything else it uses is
public. tests/test_trainer.py checks that transformers still has and uses each, and that this file uses no other."""


class MRPOTrainer(Trainer):
    """``transformers.Trainer`` whose loss is MRPO (DPO when K = 1) against cached reference log-probs.

    Use with ``collator.PreferenceDataset`` / ``PreferenceCollator`` (padded, padding-free or prefix-shared
    batches: the batch's keys pick the log-prob path, ``policy_logps``). The Trainer gets a copy of the caller's
    ``TrainingArguments`` with ``remove_unused_columns`` off (``trainer_arguments``: it would otherwise strip every
    column the model's forward does not name); the caller's object is left as it was. Everything else --
    checkpoints, resume, gradient accumulation, DDP/FSDP/DeepSpeed through accelerate, ``report_to`` -- is the
    Trainer's.
    """

    # Our loss is a per-micro-batch mean: the Trainer divides it by the accumulation steps (public since 5.19).
    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, loss: LossConfig | None = None, **kwargs: Any):
        if len(args) > 1:
            args = (args[0], trainer_arguments(args[1]), *args[2:])
        elif kwargs.get("args") is not None:
            kwargs["args"] = trainer_arguments(kwargs["args"])
        super().__init__(*args, **kwargs)
        self._set_trainer_internals()
        self.add_callback(LogLastAndSavedStepsCallback())
        self.loss_config = loss or LossConfig()
        self._loss_kwargs = dataclasses.asdict(self.loss_config)
        self._metrics = {"train": MetricAccumulator(), "eval": MetricAccumulator()}
        self._tokens_since_log = 0
        self._unchecked: list[tuple[torch.Tensor, list[torch.Tensor], Any]] = []
        self.add_callback(CheckLossInputsBeforeOptimizerStep(self))
        self._refuse_unsupported_micro_batches()

    def _refuse_unsupported_micro_batches(self) -> None:
        if not getattr(self.data_collator, "micro_batch_tokens", None):
            return
        if "inputs" in (self.args.include_for_metrics or []):
            raise ConfigError(
                "policy.micro_batch_tokens cannot be combined with training.include_for_metrics=['inputs'] (a split "
                "batch has no single input_ids tensor)",
                key="policy.micro_batch_tokens",
            )
        if self.is_deepspeed_enabled:
            raise ConfigError(
                "policy.micro_batch_tokens does not work under DeepSpeed (its engine counts every backward pass as "
                "an accumulation step): leave it unset and use training.gradient_accumulation_steps",
                key="policy.micro_batch_tokens",
            )

    # ------------------------------------------------------------------------------------------------------------
    # The Trainer's private parts, all here (TRAINER_INTERNALS says why each is needed)
    # ------------------------------------------------------------------------------------------------------------

    def _set_trainer_internals(self) -> None:
        # Before transformers 5.19 the Trainer reads this instead of loss_is_scaled_for_ga.
        self.model_accepts_loss_kwargs = False

    def _save_checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        # A full disk or a read-only output directory at a checkpoint: one line, not the Trainer's traceback.
        try:
            return super()._save_checkpoint(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - safetensors and torch.save report a failed write as their own
            message = write_failure(
                error,
                f"the checkpoint of step {self.state.global_step} under {self.args.output_dir}",
                no_space="free space there (the checkpoints written before it are kept: `mrpo train CONFIG "
                "--resume` goes on from the newest), or lower training.save_total_limit",
                not_writable="point training.output_dir at a writable directory",
            )
            if message is None:
                raise
            raise TrainingError(message) from error

    def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
        """Count the batch's real (non-padding) tokens, chosen and rejected, from the collator's count: no device
        work here; the processes' counts are summed once per log line (``num_tokens``, as TRL logs it)."""
        for batch in inputs.get("micro_batches", [inputs]):
            self._tokens_since_log += int(batch.get("num_tokens", 0))

    def _on_device(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return self._prepare_inputs(inputs)

    # ------------------------------------------------------------------------------------------------------------

    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        """One batch; a batch the collator split under its token budget is a forward and backward per micro-batch.

        Gradients add up across the micro-batches (each loss carries its share of the pairs as ``loss_weight``).
        Under DDP (compiled or not) only the last backward synchronises them (accelerate's ``no_sync``, as the
        Trainer defers it across accumulation steps); FSDP reduces after every micro-batch (correct, just not
        deferred: its ``no_sync`` would hold unsharded gradients).
        """
        micro_batches = inputs.get("micro_batches")
        if micro_batches is None:
            return super().training_step(model, inputs, num_items_in_batch)
        losses = []
        for index, micro_batch in enumerate(micro_batches):
            defer = index < len(micro_batches) - 1 and not self.is_fsdp_enabled
            with self.accelerator.no_sync(model) if defer else contextlib.nullcontext():
                losses.append(super().training_step(model, micro_batch, num_items_in_batch))
        return torch.stack(losses).sum()

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        count = super().floating_point_ops
        return sum(count(batch) for batch in inputs.get("micro_batches", [inputs]))

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ):
        reference_chosen = inputs["reference_chosen_logps"]
        reference_rejected = inputs["reference_rejected_logps"]
        batch_size = reference_chosen.shape[1]
        # One forward for both responses: the collator puts the chosen sequences first, then the rejected ones.
        policy = policy_logps(model, inputs, batch_size)
        logps = (policy.logps[:batch_size], policy.logps[batch_size:], reference_chosen, reference_rejected)
        # In training the inputs are checked once per optimizer step (``_check_step_logps``), not per call; under
        # DeepSpeed per call, as its engine steps inside the backward, before that check could run.
        per_step = model.training and not self.is_deepspeed_enabled
        try:
            output = mrpo_loss(
                *logps,
                **self._loss_kwargs,
                check_finite=not per_step,
                chosen_tokens=policy.token_counts[:batch_size],
                rejected_tokens=policy.token_counts[batch_size:],
            )
        except NonFiniteLogpsError as error:
            raise self._non_finite(error, inputs, training=model.training) from error
        if per_step:
            self._unchecked.append((valid_logps(*logps), [t.detach() for t in logps], inputs.get("pair_ids")))
        self._metrics["train" if model.training else "eval"].add(logged_statistics(output))
        # A micro-batch of a batch split under a token budget carries its share of the batch's pairs.
        loss = output.loss * inputs["loss_weight"] if "loss_weight" in inputs else output.loss
        if return_outputs:
            return loss, {
                "chosen_rewards": output.chosen_rewards,
                "rejected_rewards": output.rejected_rewards,
            }
        return loss

    def _check_step_logps(self) -> None:
        """Before the optimizer step: the loss inputs of every forward since the last step, finite and <= 0, in one
        host sync; if not, the first bad pair's error, as ``mrpo_loss`` would have raised it (nothing is applied)."""
        unchecked, self._unchecked = self._unchecked, []
        if not unchecked or bool(torch.stack([valid for valid, _, _ in unchecked]).all()):
            return
        for _, logps, pair_ids in unchecked:
            try:
                check_logps(*logps)
            except NonFiniteLogpsError as error:
                raise self._non_finite(error, {"pair_ids": pair_ids}, training=True) from error

    def _non_finite(
        self, error: NonFiniteLogpsError, inputs: dict[str, Any], *, training: bool
    ) -> TrainingError:
        pair_ids = inputs.get("pair_ids")
        pair = f"pair {pair_ids[error.pair]!r}" if pair_ids else f"pair {error.pair} of the batch"
        where = f"training step {self.state.global_step + 1}" if training else "evaluation"
        if error.reference is None:
            return TrainingError(
                f"{where}: the policy's log-prob of {pair} is not finite ({error}). Nothing was applied for this "
                f"step; checkpoints already saved under {self.args.output_dir} are kept. The policy diverged or "
                "overflowed its dtype: lower training.learning_rate, keep training.max_grad_norm above 0, or train "
                "in float32 / bfloat16 rather than float16."
            )
        return TrainingError(
            f"{where}: the cached log-prob of reference {error.reference + 1} for {pair} is not finite ({error}). "
            "Score that reference in float32 or bfloat16 (references[].dtype), or drop the pair from the data."
        )

    def prediction_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ):
        inputs = self._on_device(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = sum(self.compute_loss(model, batch) for batch in inputs.get("micro_batches", [inputs]))
        return loss.detach(), None, None

    def evaluation_loop(
        self,
        dataloader: Any,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ):
        """The Trainer's loop, with the statistics of every pair it evaluated under ``metric_key_prefix``."""
        output = super().evaluation_loop(
            dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
        )
        means = self._metrics["eval"].pop_means(self._sum_across_processes)
        output.metrics.update({f"{metric_key_prefix}_{name}": value for name, value in means.items()})
        return output

    def train(self, *args: Any, **kwargs: Any):
        output = super().train(*args, **kwargs)
        return output._replace(training_loss=output.metrics.get("train_loss", output.training_loss))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if not is_evaluation_log(logs):  # an evaluation's statistics are in already (evaluation_loop)
            self._add_train_statistics(logs)
        super().log(logs, start_time)

    def _add_train_statistics(self, logs: dict[str, float]) -> None:
        """The run's mean train loss, the statistics of the pairs trained on since the last line and, on a step's
        line, the real tokens seen so far."""
        if "train_loss" in logs:
            # The Trainer's own mean covers only the steps since a resume; the run's is over every step logged
            # (the saved state carries the lines before the checkpoint), as the report computes it.
            run_mean = mean_train_loss(self.state.log_history)
            logs["train_loss"] = logs["train_loss"] if run_mean is None else run_mean
        logs.update(self._metrics["train"].pop_means(self._sum_across_processes))
        if "loss" in logs:
            counted = torch.tensor(self._tokens_since_log, device=self.args.device, dtype=torch.int64)
            self.state.num_input_tokens_seen += int(self._sum_across_processes(counted))
            self._tokens_since_log = 0
            logs["num_tokens"] = float(
                self.state.num_input_tokens_seen
            )  # saved with the state: survives a resume

    def _sum_across_processes(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(tensor, reduction="sum")


def policy_logps(model: torch.nn.Module, inputs: dict[str, Any], batch_size: int) -> SequenceLogps:
    """The policy's log-probs of a batch's 2B sequences, chosen first: one forward, the path the batch's keys name
    (prefix-shared rows, packed rows or padded rows, as the collator built them)."""
    if "segment_ids" in inputs:  # prefix-shared: one row per pair, its prompt once
        return prefix_shared_sequence_logps(
            model,
            inputs["input_ids"],
            inputs["position_ids"],
            inputs["segment_ids"],
            inputs["prediction_positions"],
            inputs["prediction_targets"],
            inputs["prediction_owners"],
            num_sequences=2 * batch_size,
        )
    if "sequence_index" in inputs:  # padding-free: the collator packed the 2B sequences into one row
        return packed_sequence_logps(
            model,
            inputs["input_ids"],
            inputs["position_ids"],
            inputs["completion_mask"],
            inputs["sequence_index"],
            num_sequences=2 * batch_size,
            prediction_positions=inputs.get("prediction_positions"),
        )
    return sequence_logps(
        model,
        inputs["input_ids"],
        inputs["attention_mask"],
        inputs["completion_mask"],
        prediction_positions=inputs.get("prediction_positions"),
    )


def trainer_arguments(training_args):
    """What the Trainer gets from the caller's ``TrainingArguments``: a copy (the caller's object is left as it was)
    with ``remove_unused_columns`` off -- the Trainer would strip every column the model's forward does not name,
    all of ours -- ``logging_nan_inf_filter`` off (it reads every step's loss on the host, two syncs, to drop a
    non-finite one from the logged mean; MRPO checks its loss's inputs before every optimizer step and stops on a
    non-finite one instead) and, on a CPU, ``dataloader_pin_memory`` off (pinning needs an accelerator; torch warns
    per data loader otherwise)."""
    changes = {}
    if training_args.remove_unused_columns:
        changes["remove_unused_columns"] = False
    if training_args.logging_nan_inf_filter:
        changes["logging_nan_inf_filter"] = False
    if training_args.dataloader_pin_memory and training_args.device.type == "cpu":
        changes["dataloader_pin_memory"] = False
    if not changes:
        return training_args
    effective = copy.copy(training_args)
    for name, value in changes.items():
        setattr(effective, name, value)
    return effective


class CheckLossInputsBeforeOptimizerStep(TrainerCallback):
    """Runs ``MRPOTrainer._check_step_logps`` before each optimizer step: one host sync a step for the loss's input
    check, whatever the number of forwards (micro-batches, accumulation steps) it covers."""

    def __init__(self, trainer: MRPOTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._unchecked.clear()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._check_step_logps()


class LogLastAndSavedStepsCallback(TrainerCallback):
    """Logs the last step and every step a checkpoint is saved at, whatever ``logging_steps`` is.

    The last: a run shorter than one logging interval still has its metrics line, and the steps after the last
    interval count in metrics.jsonl and the mean loss. A checkpoint's: a run resumed from it starts logging afresh
    there, so the loss of the steps between the previous line and the checkpoint would be in no line.
    """

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps or control.should_save:
            control.should_log = True

    def on_epoch_end(self, args, state, control, **kwargs):
        if control.should_save:
            control.should_log = True


class JsonlMetricsCallback(TrainerCallback):
    """Appends every log line (train and eval) to a JSONL file as it happens, so a crash loses no metrics.

    On a resume from checkpoint-N the lines the interrupted run wrote after step N (and its end-of-training line)
    are removed first: the resumed run logs those steps again, and the file keeps one line per step.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or state.global_step == 0 or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # the half-written last line of a killed run
            is_log = "loss" in record or any(key.startswith("eval_") for key in record)
            if is_log and isinstance(record.get("step"), int) and record["step"] <= state.global_step:
                kept.append(line)
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        temporary.replace(self.path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            record = {"step": state.global_step, "epoch": state.epoch, **logs}
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")


class HeldOutProgressCallback(ProgressCallback):
    """The Trainer's progress bars, with the evaluation bar saying what it evaluates -- the held-out split, the
    policy at its current step, how many pairs -- where the Trainer's own bar counts unlabelled batches."""

    def __init__(self, pairs: int, split: str = "eval split"):
        super().__init__()
        self.pairs, self.split = pairs, split

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if self.prediction_bar is None and state.is_world_process_zero and has_length(eval_dataloader):
            from tqdm.auto import tqdm

            self.prediction_bar = tqdm(
                total=len(eval_dataloader),
                leave=self.training_bar is None,
                dynamic_ncols=True,
                unit="batch",
                desc=f"held-out {self.split}: {self.pairs} pairs, policy at step {state.global_step}",
            )
        super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)
