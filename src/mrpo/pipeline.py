"""Pipeline steps behind the CLI: precompute the reference cache, inspect it, train, evaluate.

Each step takes a validated ``MRPOConfig`` and starts from the same data path, ``prepared_split.prepare_split``:
read the pairs and tokenize them for the policy and every reference jointly (``splits.py``: a pair too long for any
model is dropped for all), make sure every reference's cache holds them (``references.py``), and attach the K cached
columns to the policy's tokens (``collator.py``). ``mrpo train`` builds its trainer with ``assemble.py``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mrpo.assemble import assemble_trainer
from mrpo.config.schema import MRPOConfig
from mrpo.errors import CacheError, DataError, Terminated, TrainingInterrupted, TrainingTerminated
from mrpo.preflight import (
    check_resumable,
    check_services,
    claim_output_dir,
    finished_step,
    resume_checkpoint,
)
from mrpo.prepared_split import PreparedSplit, prepare_split
from mrpo.rundir import (
    CONFIG_FILE,
    DATA_SUMMARY_FILE,
    EVAL_RESULTS_FILE,
    FINAL_DIR,
    INSPECT_FILE,
    MERGED_DIR,
    METRICS_FILE,
    SUSPECTS_FILE,
    latest_checkpoint,
    write_model_card,
)
from mrpo.splits import (
    TokenizedSplit,
    Views,
    find_pairs,
    load_views,
    report_overlap,
    stream_split,
    tokenize_split,
)

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# mrpo precompute
# ----------------------------------------------------------------------------------------------------------------


def run_precompute(config: MRPOConfig) -> dict[str, PreparedSplit]:
    """Fill the reference cache for the train split (and the eval split when configured)."""
    views = load_views(config)
    splits = {"train": prepare_split(config, "train", views)}
    if config.data.eval is not None:
        splits["eval"] = prepare_split(config, "eval", views)
        report_overlap(config, splits["eval"].tokenization.pair_ids, splits["train"].tokenization.pair_ids)
    return splits


# ----------------------------------------------------------------------------------------------------------------
# mrpo inspect
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class InspectResult:
    audits: list[Any]
    """One ``audit.SplitAudit`` per split (train, then eval when configured)."""
    output_dir: Path
    inspect_file: Path
    suspects_file: Path


def run_inspect(
    config: MRPOConfig,
    *,
    output: str | Path | None = None,
    suspect_threshold: float | None = None,
    config_path: str | None = None,
    show_progress: bool = True,
) -> InspectResult:
    """Audit every reference from the cache (nothing is scored): write ``inspect.json`` and ``suspect_pairs.jsonl``.

    Reads the data and the reference stores only; a store that is missing or incomplete is a CacheError naming the
    reference to precompute. Output goes to ``output`` (default: ``training.output_dir``).
    """
    from tqdm.auto import tqdm

    from mrpo.audit_suspects import SUSPECT_THRESHOLD
    from mrpo.weights import model_fingerprint

    threshold = SUSPECT_THRESHOLD if suspect_threshold is None else suspect_threshold
    splits = ["train", *(["eval"] if config.data.eval is not None else [])]
    audits, suspect_rows = [], []
    with (
        tqdm(total=1 + len(splits), desc="inspect", unit="step", disable=not show_progress) as bar,
        ThreadPoolExecutor(max_workers=1) as pool,
    ):
        # Hash the reference weights (hashlib releases the GIL) while the tokenizers load; the store keys then
        # find the digests memoised.
        hashing = pool.submit(lambda: [model_fingerprint(r.model, r.hash_weights) for r in config.references])
        views = load_views(config)
        hashing.result()
        bar.update()
        for split in splits:
            audit, rows = _inspect_split(config, split, views, threshold, config_path)
            audits.append(audit)
            suspect_rows += rows
            bar.update()
    directory = Path(output) if output is not None else Path(config.training.output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    inspect_file, suspects_file = directory / INSPECT_FILE, directory / SUSPECTS_FILE
    _write_json(
        inspect_file,
        {"references": [r.name for r in config.references], "splits": [a.to_json() for a in audits]},
    )
    with suspects_file.open("w", encoding="utf-8") as handle:
        for row in suspect_rows:
            handle.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    return InspectResult(audits, directory, inspect_file, suspects_file)


def _inspect_split(config: MRPOConfig, split: str, views: Views, threshold: float, config_path: str | None):
    """The audit of one split from the cached columns, and its suspect pairs as rows with their text."""
    from mrpo.audit import audit_split
    from mrpo.references import open_cache

    tokenized = tokenize_split(config, split, views)
    pair_ids = tokenized.tokenization.pair_ids
    cache = open_cache(
        tokenized.references,
        views.references,
        pair_ids,
        config.cache_dir,
        overflow=config.data.overflow,
        config_path=config_path,
        tokenized=tokenized.tokenization.per_view[1:],
    )
    columns = cache.columns(pair_ids)
    lengths = _completion_lengths(config, split, tokenized, pair_ids)
    audit = audit_split(
        split,
        cache.names,
        pair_ids,
        columns["reference_chosen_logps"],
        columns["reference_rejected_logps"],
        columns["reference_chosen_tokens"],
        columns["reference_rejected_tokens"],
        config.loss,
        chosen_lengths=lengths[0] if lengths is not None else None,
        rejected_lengths=lengths[1] if lengths is not None else None,
        suspect_threshold=threshold,
        clip_saturation=config.diagnostics.clip_saturation,
    )
    by_id = find_pairs(config, split, tokenized, {suspect.pair_id for suspect in audit.suspects})
    lost = [suspect.pair_id for suspect in audit.suspects if suspect.pair_id not in by_id]
    if lost:
        raise CacheError(
            f"{len(lost)} {split} pair(s) of the tokenized cache (first: pair id {lost[0]}) are no longer in "
            f"{tokenized.counts.source}: the file changed since it was tokenized. Run again with "
            "data.cache_tokenized=false, or remove its entries "
            f"(`mrpo cache prune --cache-dir {config.cache_dir} --source {tokenized.counts.source}`)"
        )
    rows = []
    for rank, suspect in enumerate(audit.suspects, start=1):
        pair = by_id[suspect.pair_id]
        rows.append(
            {
                "split": split,
                "rank": rank,
                **dataclasses.asdict(suspect),
                "prompt": pair.prompt,
                "chosen": pair.chosen,
                "rejected": pair.rejected,
                **({"metadata": pair.metadata} if pair.metadata else {}),
            }
        )
    return audit, rows


def _completion_lengths(
    config: MRPOConfig, split: str, tokenized: TokenizedSplit, pair_ids: Sequence[str]
) -> torch.Tensor | None:
    """``(2, N)`` characters of each pair's chosen and rejected completion text, aligned with ``pair_ids``: the same
    for every reference whatever its tokenizer, so the audit can ask whether a reference's margins follow the
    answers' length. One pass over the split's pairs (read again when its tokens came from the disk cache); None,
    with a warning, if some pair is no longer in the data."""
    wanted = set(pair_ids)
    found: dict[str, tuple[int, int]] = {}  # by id: a pair kept twice has one text
    for pair in tokenized.pairs if tokenized.pairs is not None else stream_split(config, split):
        if pair.pair_id in wanted:
            found[pair.pair_id] = (_characters(pair.chosen), _characters(pair.rejected))
    missing = len(wanted) - len(found)
    if missing:
        logger.warning(
            "%s split: %d of %d pairs were not found in the data again; the audit leaves out the length comparison",
            split, missing, len(wanted),
        )  # fmt: skip
        return None
    lengths = np.array([found[pair_id] for pair_id in pair_ids], dtype=np.int64).reshape(-1, 2).T
    return torch.from_numpy(np.ascontiguousarray(lengths))


def _characters(text: str | list[dict]) -> int:
    """A completion's length in characters: the string, or the content of its messages."""
    return len(text) if isinstance(text, str) else sum(len(message["content"]) for message in text)


# ----------------------------------------------------------------------------------------------------------------
# mrpo train
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    output_dir: Path
    metrics_file: Path
    final_model_dir: Path
    merged_model_dir: Path | None
    train_metrics: dict[str, Any]
    eval_metrics: dict[str, Any] | None
    eval_summary: str | None = None
    """The end-of-training held-out figures in a line or two (``evaluation.training_evaluation_summary``)."""
    finished_at: int | None = None
    """Set when a resume found the run already finished (at this step): nothing was trained or written."""


def run_train(
    config: MRPOConfig,
    *,
    resume: str | bool | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> TrainResult:
    """Train the policy; write the resolved config, the metrics and the final model under training.output_dir.

    A fresh run refuses a directory that holds another run unless ``overwrite`` (which clears what that run wrote);
    a resumed run refuses settings that would change its maths. Both are checked before anything is loaded.
    """
    from mrpo.config.training import effective_training_arguments

    config = config.with_absolute_paths()
    args = config.training.to_training_arguments()
    output_dir = Path(args.output_dir)
    resume = resume if resume is not None else config.training.resume_from_checkpoint
    check_services(config)  # trackers and the Hub, before --overwrite clears anything
    checkpoint = resume_checkpoint(output_dir, resume)  # before minutes of loading: a bad --resume fails now
    effective = effective_training_arguments(args)
    if checkpoint is not None:
        check_resumable(output_dir / CONFIG_FILE, config, effective)
    finished = finished_step(checkpoint, effective)
    if finished is not None:  # resuming would train a step at learning rate 0 and rewrite final/
        merged = output_dir / MERGED_DIR
        return TrainResult(
            output_dir, output_dir / METRICS_FILE, output_dir / FINAL_DIR, merged if merged.is_dir() else None,
            {}, None, finished_at=finished,
        )  # fmt: skip
    _claim_run_directory(config, args, effective, fresh=checkpoint is None, overwrite=overwrite)

    run = assemble_trainer(config, args, show_progress=show_progress)
    trainer, views, eval_split = run.trainer, run.views, run.eval
    from accelerate import PartialState

    # One writer: the model card reads it back, while another process would be rewriting it.
    if PartialState().is_main_process:
        _write_json(output_dir / DATA_SUMMARY_FILE, _data_summary(run.train, eval_split))
    train_output = _train_or_say_where_it_stopped(trainer, checkpoint, output_dir)
    eval_metrics, eval_summary = None, None
    if eval_split is not None:
        eval_metrics, eval_summary = _evaluate_at_the_end(
            trainer, config, eval_split, output_dir, show_progress
        )
    final_dir, merged_dir = save_final_model(trainer, config, views, output_dir)
    if trainer.is_world_process_zero():
        summary = json.loads((output_dir / DATA_SUMMARY_FILE).read_text(encoding="utf-8"))
        write_model_card(output_dir, config.to_dict(), summary)
    return TrainResult(
        output_dir, output_dir / METRICS_FILE, final_dir, merged_dir, train_output.metrics, eval_metrics,
        eval_summary,
    )  # fmt: skip


def _train_or_say_where_it_stopped(trainer, checkpoint: str | None, output_dir: Path) -> Any:
    """``trainer.train()`` (from ``checkpoint`` when resuming); a Ctrl-C or SIGTERM (cli raises Terminated for it)
    becomes TrainingInterrupted or TrainingTerminated, saying the step and the last complete checkpoint."""
    try:
        return trainer.train(resume_from_checkpoint=checkpoint)
    except KeyboardInterrupt as stop:
        saved, _ = latest_checkpoint(output_dir)
        where = f"the last complete checkpoint is {saved.name}" if saved else "no checkpoint was saved yet"
        error, what = (
            (TrainingTerminated, "terminated (SIGTERM)")
            if isinstance(stop, Terminated)
            else (TrainingInterrupted, "interrupted")
        )
        step = trainer.state.global_step
        raise error(f"{what} at step {step} ({where})", step=step) from None


def _evaluate_at_the_end(
    trainer, config: MRPOConfig, eval_split: PreparedSplit, output_dir: Path, show_progress: bool
) -> tuple[dict[str, Any], str]:
    """The trained policy's held-out metrics (``trainer.evaluate()``), announced first, and their summary."""
    from mrpo.evaluation import training_evaluation_summary

    pairs, step = len(eval_split.dataset), trainer.state.global_step
    if show_progress and trainer.is_world_process_zero():
        print(_evaluation_notice(config, pairs, step), file=sys.stderr)
    metrics = trainer.evaluate()
    summary = training_evaluation_summary(
        metrics, pairs, step, config.loss, len(config.references), output_dir / CONFIG_FILE
    )
    return metrics, summary


def _evaluation_notice(config: MRPOConfig, pairs: int, step: int) -> str:
    """Said before the end-of-training evaluation, which can take longer than a short run's training."""
    cap = config.data.max_eval_pairs
    how = (
        f"data.max_eval_pairs = {cap} caps it"
        if cap is not None
        else "all of them: set data.max_eval_pairs to evaluate fewer, or leave data.eval unset to skip this"
    )
    return (
        f"evaluating the trained policy (step {step}) on {pairs} held-out pairs of {config.data.eval} ({how})"
    )


def _claim_run_directory(
    config: MRPOConfig, args, effective: dict[str, Any], *, fresh: bool, overwrite: bool
) -> None:
    """A fresh run claims its directory (none other's run may be there); then the resolved config is written into
    it. Under several processes only the main one does, once every process has read the run's saved config (a
    resume's check), and the others wait for it: were each to claim the directory, a slower one would find the
    config the first had just written, "another run"."""
    from accelerate import PartialState

    args.device  # noqa: B018  (the Trainer's own device set-up first: it tells the shared state to stay on CPU)
    state = PartialState()
    state.wait_for_everyone()
    with state.main_process_first():
        if not state.is_main_process:
            return
        output_dir = Path(args.output_dir)
        if fresh:
            claim_output_dir(output_dir, overwrite=overwrite)
        output_dir.mkdir(parents=True, exist_ok=True)
        config.save(output_dir / CONFIG_FILE, training=effective)


def save_final_model(trainer, config: MRPOConfig, views: Views, output_dir: Path) -> tuple[Path, Path | None]:
    """The trained model into ``final/``; a LoRA adapter also at the top of the run directory (small), so
    ``AutoPeftModelForCausalLM.from_pretrained(output_dir)`` loads it as it loads a TRL run; optionally merged."""
    final_dir = output_dir / FINAL_DIR
    trainer.save_model(str(final_dir))
    if config.lora.enabled:
        trainer.save_model(str(output_dir))
    merged_dir = None
    if config.lora.enabled and config.lora.save_merged and trainer.is_world_process_zero():
        merged_dir = output_dir / MERGED_DIR
        trainer.accelerator.unwrap_model(trainer.model).merge_and_unload().save_pretrained(merged_dir)
        views.policy.tokenizer.save_pretrained(merged_dir)
    return final_dir, merged_dir


def _data_summary(train: PreparedSplit, eval_split: PreparedSplit | None) -> dict[str, Any]:
    summary = {}
    for name, split in (("train", train), ("eval", eval_split)):
        if split is None:
            continue
        summary[name] = {
            "source": split.counts.source,
            "rows_read": split.counts.rows_read,
            "pairs_loaded": split.counts.kept,
            "pairs_used": len(split.tokenization.pair_ids),
            "dropped_on_load": dict(split.counts.dropped),
            "dropped_by_tokenization": dict(split.tokenization.dropped),
            "references": [dataclasses.asdict(report) for report in split.cache.reports],
        }
    return summary


def _write_json(path: Path, content: Any) -> None:
    path.write_text(json.dumps(content, indent=2, default=str) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------------
# mrpo evaluate
# ----------------------------------------------------------------------------------------------------------------


def default_checkpoint(config: MRPOConfig) -> str | None:
    """The run's final model when it exists (what ``mrpo train`` saved), else None."""
    final = Path(config.training.output_dir) / FINAL_DIR
    return str(final) if final.exists() else None


def evaluation_checkpoints(
    config: MRPOConfig, checkpoints: dict[str, str | None] | None = None
) -> dict[str, str | None]:
    """The models to evaluate: the given ones, or the starting model plus the run's final model if it exists."""
    if checkpoints is not None:
        return dict(checkpoints)
    chosen: dict[str, str | None] = {"start": None}
    trained = default_checkpoint(config)
    if trained is not None:
        chosen[Path(config.training.output_dir).name or "trained"] = trained
    return chosen


def run_evaluate(
    config: MRPOConfig,
    *,
    checkpoints: dict[str, str | None] | None = None,
    output: str | Path | None = None,
    show_progress: bool = True,
    baseline: str | None = None,
):
    """Held-out metrics of each model in ``checkpoints`` (label -> checkpoint dir; None = the starting model).

    By default: the starting model and, when the run has one, its final model. All are scored on the same pairs, so
    with two trained models or more each gets the paired difference of its policy preference accuracy from
    ``baseline`` (default: "dpo" if evaluated, else the first trained model). Writes ``eval_results.json``.
    """
    from mrpo.evaluation import (
        add_paired_differences,
        policy_correct,
        results_to_json,
        score_split,
        scores_prefix_shared,
        split_metrics,
    )
    from mrpo.models import default_device, load_for_evaluation

    if config.data.eval is None:
        raise DataError("data.eval is not set: name the held-out pairs to evaluate on (data.eval=PATH)")
    checkpoints = evaluation_checkpoints(config, checkpoints)
    prepared = prepare_split(config, "eval", show_progress=show_progress)
    report_overlap(config, prepared.tokenization.pair_ids)
    device = default_device()
    results, correct = [], {}
    for label, checkpoint in checkpoints.items():
        model = load_for_evaluation(config, checkpoint, device)
        logps, tokens = score_split(
            model,
            prepared,
            label,
            show_progress=show_progress,
            prefix_shared=scores_prefix_shared(config, model),
        )
        del model
        result = split_metrics(
            label,
            checkpoint or config.policy.model,
            prepared,
            config.loss,
            logps,
            tokens,
            initialising=checkpoint is None,
        )
        result.trained_pairs, result.trained_drops = trained_pair_count(checkpoint)
        results.append(result)
        correct[label] = policy_correct(logps)
    trained = [label for label, checkpoint in checkpoints.items() if checkpoint is not None]
    add_paired_differences(results, correct, trained, baseline)
    output = Path(output) if output else Path(config.training.output_dir) / EVAL_RESULTS_FILE
    results_to_json(results, config, output)
    return results, output


def trained_pair_count(checkpoint: str | None) -> tuple[int | None, dict[str, int]]:
    """How many pairs a checkpoint was trained on, and its train split's drops by reason, from its run's
    ``data_summary.json`` (in the checkpoint directory or the run directory above it: final/, checkpoint-N/);
    ``(None, {})`` for the starting model or when no readable summary is found (the count is only a note)."""
    from mrpo.evaluation import summary_drops

    if checkpoint is None:
        return None, {}
    for directory in (Path(checkpoint), Path(checkpoint).parent):
        path = directory / DATA_SUMMARY_FILE
        if not path.is_file():
            continue
        try:
            train = json.loads(path.read_text(encoding="utf-8"))["train"]
            drops = summary_drops(train)
            pairs = train["pairs_used"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None, {}
        return (pairs if isinstance(pairs, int) else None), drops
    return None, {}
