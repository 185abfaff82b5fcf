"""Held-out metrics (docs/method.md §5) for any model against the cached references, side by side and fairly comparable.

Three accuracies answer three different questions:

- **policy preference accuracy** -- does the model itself prefer the chosen answer (``pw > pl``)? Needs no
  reference and no label-dependent weight, so it compares any runs; also given per token (length-normalised);
- **implicit reward accuracy against the initialising reference** -- ``(pw - l_1(y_w)) > (pl - l_1(y_l))``:
  comparable between DPO and MRPO runs that start from the same model;
- **implicit reward accuracy against the virtual reference** -- the quantity the paper's trainer reports
  (``rewards/accuracies``). With adaptive CTRO and K > 1 the virtual reference is built with knowledge of which
  answer is the chosen one, so this number *sees the label*; it is flagged ``label_aware``.

The accuracies come with 95% Wilson intervals (each pair is a yes or a no). When several trained models are scored
on the same pairs, each gets the paired difference of its policy preference accuracy from a baseline's (the model
labelled "dpo" when there is one, else the first trained model): "did the extra reference help?" is whether that
interval excludes 0.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from mrpo.audit_stats import WILSON_Z, wilson_interval
from mrpo.config.schema import LossConfig, MRPOConfig
from mrpo.errors import ConfigError
from mrpo.formatting import percent, signed
from mrpo.losses import mrpo_loss, per_token


@dataclass(frozen=True)
class Metric:
    label: str
    """What tables and plots call it."""
    kind: Literal["rate", "margin"]
    """A share in [0, 1] (shown as a percentage) or a mean margin in nats (shown signed)."""
    per_pair: bool = False
    """A share of pairs, each a yes or a no: it gets a 95% Wilson interval. (The clip rate is a share of
    log-probs, several per pair and not independent: it gets none.)"""

    def format(self, value: Any) -> str:
        """``75.0%`` or ``+0.805``; ``—`` when there is no number (``mrpo.formatting``'s rule)."""
        return percent(value) if self.kind == "rate" else signed(value)


METRICS = {
    "policy_accuracy": Metric("policy pref. acc. (pw > pl)", "rate", per_pair=True),
    "policy_accuracy_per_token": Metric("policy pref. acc. per token", "rate", per_pair=True),
    "reward_accuracy_initialising": Metric("reward acc. vs initialising ref", "rate", per_pair=True),
    "reward_accuracy_virtual": Metric("reward acc. vs virtual ref", "rate", per_pair=True),
    "policy_margin": Metric("mean policy margin pw - pl (nats)", "margin"),
    "reward_margin_initialising": Metric("mean reward margin vs initialising", "margin"),
    "reward_margin_virtual": Metric("mean reward margin vs virtual", "margin"),
    "clip_rate": Metric("CTRO clip rate", "rate"),
}
"""The held-out metrics in display order."""

LABEL_AWARE_METRIC = "reward_accuracy_virtual"
LABEL_AWARE_NOTE = "label-aware: adaptive CTRO builds this reference knowing which answer is the chosen one."
"""Said once, wherever the label-aware metric is shown with its asterisk."""


@dataclass
class HeldOutMetrics:
    """Metrics of one model on one held-out split."""

    label: str
    """Which model: "start", a run name, ..."""
    model: str
    """Where it was loaded from."""
    pairs: int
    metrics: dict[str, float]
    """Keys of ``METRICS``."""
    label_aware: bool
    """True when ``reward_accuracy_virtual`` uses a label-dependent (adaptive CTRO) virtual reference."""
    by_kind: dict[str, dict[str, float]] = field(default_factory=dict)
    """The same metrics per value of the pairs' ``kind`` metadata column, when the data has one."""
    intervals: dict[str, list[float]] = field(default_factory=dict)
    """``[low, high]``: the 95% Wilson interval of each per-pair rate (``Metric.per_pair``)."""
    paired: dict[str, Any] | None = None
    """Its policy preference accuracy minus the baseline's on the same pairs (``paired_difference``); None for the
    baseline, an untrained model, or when fewer than two trained models were scored together."""
    trained_pairs: int | None = None
    """How many pairs the model was trained on (its run's data summary); None for the start or when unknown."""
    trained_drops: dict[str, int] = field(default_factory=dict)
    """Its run's train pairs dropped on load and by tokenization, by reason: why ``trained_pairs`` differ."""


def compute_metrics(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    policy_chosen_tokens: torch.Tensor,
    policy_rejected_tokens: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    loss: LossConfig,
) -> dict[str, float]:
    """The held-out metrics of method.md §5 from sequence log-probs.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``(N,)`` the evaluated model's sequence log-probs.
        policy_chosen_tokens, policy_rejected_tokens: ``(N,)`` their completion token counts.
        reference_chosen_logps, reference_rejected_logps: ``(K, N)`` cached references, row 0 initialising.
        loss: the loss settings that define the virtual reference (beta, weights, clip, eps, aggregation, align).
    """
    pw, pl = policy_chosen_logps.double(), policy_rejected_logps.double()
    rc, rr = reference_chosen_logps.double(), reference_rejected_logps.double()
    beta = loss.beta
    virtual = mrpo_loss(
        pw,
        pl,
        rc,
        rr,
        **dataclasses.asdict(loss),
        chosen_tokens=policy_chosen_tokens,
        rejected_tokens=policy_rejected_tokens,
    )
    if loss.length_normalize:  # the rewards of the loss's own view (§7): every log-prob per policy token
        (nw, ncw), (nl, ncl) = (
            per_token(pw, rc, policy_chosen_tokens),
            per_token(pl, rr, policy_rejected_tokens),
        )
        initialising_margin = beta * ((nw - ncw[0]) - (nl - ncl[0]))
    else:
        initialising_margin = beta * ((pw - rc[0]) - (pl - rr[0]))
    virtual_margin = virtual.chosen_rewards - virtual.rejected_rewards
    per_token_chosen = pw / policy_chosen_tokens.clamp(min=1).double()
    per_token_rejected = pl / policy_rejected_tokens.clamp(min=1).double()
    return {
        "policy_accuracy": _mean(pw > pl),
        "policy_accuracy_per_token": _mean(per_token_chosen > per_token_rejected),
        "reward_accuracy_initialising": _mean(initialising_margin > 0),
        "reward_accuracy_virtual": _mean(virtual_margin > 0),
        "policy_margin": _mean(pw - pl),
        "reward_margin_initialising": _mean(initialising_margin),
        "reward_margin_virtual": _mean(virtual_margin),
        "clip_rate": _mean(virtual.clip_rate),
    }


def is_label_aware(loss: LossConfig, num_references: int) -> bool:
    """Adaptive eps splits eps_max by which answer is chosen; with one reference nothing is clipped."""
    return loss.clip == "adaptive" and num_references > 1


def _mean(values: torch.Tensor) -> float:
    return float(values.double().mean()) if values.numel() else math.nan


def rate_intervals(metrics: dict[str, float], pairs: int) -> dict[str, list[float]]:
    """95% Wilson intervals of the per-pair rates: each is a mean of ``pairs`` yes/no, so rate x pairs counts."""
    return {
        key: list(wilson_interval(round(metrics[key] * pairs), pairs))
        for key, metric in METRICS.items()
        if metric.per_pair and math.isfinite(metrics.get(key, math.nan))
    }


PAIRED_METHOD = "mean over the shared pairs of the per-pair difference in correctness (pw > pl) ± 1.96·sd/√n"
"""How the paired interval is computed (a normal interval on the per-pair differences, each -1, 0 or +1)."""


def policy_correct(logps: torch.Tensor) -> torch.Tensor:
    """``(N,)`` whether the model prefers the chosen answer of each pair, from ``score_split``'s ``(N, 2)``."""
    return logps[:, 0] > logps[:, 1]


def paired_difference(correct: torch.Tensor, baseline_correct: torch.Tensor, baseline: str) -> dict[str, Any]:
    """Policy preference accuracy of one model minus the baseline's, over the same pairs in the same order.

    Pairing removes the pairs' own difficulty from the comparison, so the interval is far narrower than the two
    accuracies' intervals side by side. ``better``/``worse``: pairs only this model / only the baseline got right.
    """
    difference = correct.double() - baseline_correct.double()
    n = difference.numel()
    mean = float(difference.mean()) if n else math.nan
    half = WILSON_Z * float(difference.std(correction=1)) / math.sqrt(n) if n > 1 else math.nan
    return {
        "baseline": baseline,
        "metric": "policy_accuracy",
        "pairs": n,
        "difference": mean,
        "low": max(-1.0, mean - half),  # a difference of shares lies in [-1, 1]
        "high": min(1.0, mean + half),
        "better": int((difference > 0).sum()),
        "worse": int((difference < 0).sum()),
        "method": PAIRED_METHOD,
    }


def add_paired_differences(
    results: Sequence[HeldOutMetrics],
    correct: dict[str, torch.Tensor],
    trained: Sequence[str],
    baseline: str | None = None,
) -> str | None:
    """Give every trained model but the baseline its ``paired`` difference; returns the baseline's label.

    ``correct``: label -> ``policy_correct`` on one shared split. The baseline is ``baseline`` when given, else the
    trained model labelled "dpo", else the first trained one; with fewer than two trained models there is nothing
    to pair (None).
    """
    if baseline is not None and baseline not in correct:
        raise ConfigError(f"baseline {baseline!r} is not among the evaluated models ({', '.join(correct)})")
    if baseline is None:
        if len(trained) < 2:
            return None
        baseline = "dpo" if "dpo" in trained else trained[0]
    for result in results:
        if result.label in trained and result.label != baseline:
            result.paired = paired_difference(correct[result.label], correct[baseline], baseline)
    return baseline


# ----------------------------------------------------------------------------------------------------------------
# Scoring models on a prepared split
# ----------------------------------------------------------------------------------------------------------------


def evaluate_model(
    model,
    label: str,
    model_source: str,
    prepared,
    config: MRPOConfig,
    *,
    batch_tokens: int = 8192,
    show_progress: bool = True,
    initialising: bool = False,
) -> HeldOutMetrics:
    """Score ``model`` on a prepared split (see ``prepared_split.prepare_split``) and compute its metrics.

    ``initialising``: the model is the initialising reference itself (the untrained start), see ``split_metrics``.
    """
    logps, tokens = score_split(
        model,
        prepared,
        label,
        batch_tokens=batch_tokens,
        show_progress=show_progress,
        prefix_shared=scores_prefix_shared(config, model),
    )
    return split_metrics(label, model_source, prepared, config.loss, logps, tokens, initialising=initialising)


def scores_prefix_shared(config, model) -> bool:
    """Whether the held-out scoring of ``model`` (the policy, on its device) uses prefix-shared rows
    (``policy.prefix_shared``, "auto" resolved by ``fast_path`` for the device and the loaded model)."""
    from mrpo.fast_path import choose_fast_path, use_shared_rows
    from mrpo.logprobs import prefix_shared_refusal

    cuda = next(model.parameters()).device.type == "cuda"
    chosen = choose_fast_path(config.policy, cuda=cuda).rows == "prefix_shared"
    refusal = prefix_shared_refusal(model) if chosen else None
    return use_shared_rows(config.policy.prefix_shared, chosen, refusal, key="policy.prefix_shared")


def score_split(
    model,
    prepared,
    label: str = "model",
    *,
    batch_tokens: int = 8192,
    show_progress: bool = True,
    prefix_shared: bool = False,
):
    """The model's sequence log-probs ``(N, 2)`` (chosen, rejected) and completion token counts ``(N, 2)`` on a
    prepared split, in the split's pair order; ``prefix_shared``: each pair in one row, its prompt once
    (``policy.prefix_shared``)."""
    from tqdm.auto import tqdm

    from mrpo.references import score_pairs

    dataset = prepared.dataset
    with tqdm(total=len(dataset), unit="pair", desc=f"evaluate {label}", disable=not show_progress) as bar:
        return score_pairs(
            model, prepared.views.policy, dataset.pairs, batch_tokens, bar.update, prefix_shared=prefix_shared
        )


def split_metrics(
    label: str,
    model_source: str,
    prepared,
    loss: LossConfig,
    logps: torch.Tensor,
    tokens: torch.Tensor,
    *,
    reference_rows: Sequence[int] | None = None,
    initialising: bool = False,
) -> HeldOutMetrics:
    """The held-out metrics of a split from a model's log-probs on it (``score_split``), overall and by kind.

    ``reference_rows`` picks which of the split's cached reference columns the metrics are measured against (all,
    by default), so one scored split serves runs with different references. ``initialising``: the model is the
    initialising reference itself, so its every margin against it is 0 and the share above 0 is float noise: that
    accuracy is n/a (NaN, shown "—"); the margin, 0, stays.
    """
    dataset = prepared.dataset
    rows = list(range(dataset.num_references)) if reference_rows is None else list(reference_rows)
    reference_chosen = dataset.reference_chosen_logps[rows]
    reference_rejected = dataset.reference_rejected_logps[rows]
    arguments = (logps[:, 0], logps[:, 1], tokens[:, 0], tokens[:, 1], reference_chosen, reference_rejected)
    metrics = compute_metrics(*arguments, loss)
    by_kind: dict[str, dict[str, float]] = {}
    kinds = split_kinds(prepared)
    if kinds is not None:
        for kind in sorted(set(kinds)):
            index = torch.tensor([i for i, k in enumerate(kinds) if k == kind])
            by_kind[kind] = compute_metrics(
                *(a[index] for a in arguments[:4]),
                reference_chosen[:, index],
                reference_rejected[:, index],
                loss,
            )
            by_kind[kind]["pairs"] = len(index)
    if initialising:
        for values in (metrics, *by_kind.values()):
            values["reward_accuracy_initialising"] = math.nan
    return HeldOutMetrics(
        label=label,
        model=model_source,
        pairs=len(dataset),
        metrics=metrics,
        label_aware=is_label_aware(loss, len(rows)),
        by_kind=by_kind,
        intervals=rate_intervals(metrics, len(dataset)),
    )


def split_kinds(prepared) -> list[str] | None:
    """The `kind` metadata of each pair of a prepared split, in its order; None when some pair has none.

    Each kept pair takes the kind of its own row: the kept ids are the read's pairs in order, less the dropped ones,
    so the rows are walked alongside them. (Looking kinds up by pair id would give two rows with the same texts and
    different kinds one kind.) Rows with the same texts are kept or dropped together, so the walk cannot skew.
    """
    kept_ids = iter(prepared.tokenization.pair_ids)
    next_id = next(kept_ids, None)
    kinds = []
    for pair in prepared.text_pairs():
        if next_id is None:
            break
        if pair.pair_id == next_id:
            kinds.append(pair.metadata.get("kind"))
            next_id = next(kept_ids, None)
    if next_id is not None or any(kind is None for kind in kinds):
        return None  # some pair has no kind (or the source no longer holds every kept pair)
    return [str(kind) for kind in kinds]


def training_evaluation_summary(
    metrics: dict[str, Any],
    pairs: int,
    step: int,
    loss: LossConfig,
    num_references: int,
    config_file: str | Path,
) -> str:
    """What the Trainer's evaluation at the end of training measured, in two lines: its loss and implicit rewards
    against the run's own virtual reference (``mrpo evaluate`` gives the comparable policy accuracies)."""
    reward = METRICS["reward_accuracy_virtual"].format(metrics.get("eval_rewards/accuracies"))
    parts = [
        f"loss {metrics['eval_loss']:.4f}" if _finite(metrics.get("eval_loss")) else "loss —",
        f"reward accuracy {reward}" + ("*" if is_label_aware(loss, num_references) else ""),
        f"reward margin {METRICS['reward_margin_virtual'].format(metrics.get('eval_rewards/margins'))}",
    ]
    if num_references > 1:
        parts.append(f"CTRO clip rate {METRICS['clip_rate'].format(metrics.get('eval_ctro/clip_rate'))}")
    first = f"held-out ({pairs} pairs, step {step}): " + ", ".join(parts)
    note = f"* {LABEL_AWARE_NOTE} " if is_label_aware(loss, num_references) else ""
    evaluate = (
        f"policy accuracies with 95% intervals, into the run for mrpo report: mrpo evaluate {config_file}"
    )
    return f"{first}\n{note}For {evaluate}"


# ----------------------------------------------------------------------------------------------------------------
# Output: JSON and a terminal table
# ----------------------------------------------------------------------------------------------------------------


def results_to_json(
    results: Sequence[HeldOutMetrics], config: MRPOConfig, path: str | Path
) -> dict[str, Any]:
    """Write ``eval_results.json``: the models' metrics plus what they were measured against."""
    content = {
        "split": {"source": config.data.eval, "split": config.data.eval_split},
        "references": [reference.name for reference in config.references],
        "loss": dataclasses.asdict(config.loss),
        "models": [dataclasses.asdict(result) for result in results],
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    return content


def format_table(results: Sequence[HeldOutMetrics]) -> str:
    """A fixed-width table: one row per metric, one column per model; rates with their 95% intervals, the paired
    difference from the baseline, and a note when the models were trained on different numbers of pairs."""
    rows = [("pairs", [str(r.pairs) for r in results])]
    if any(r.trained_pairs is not None for r in results):
        rows.append(
            (
                "trained on (pairs)",
                ["—" if r.trained_pairs is None else str(r.trained_pairs) for r in results],
            )
        )
    for key, metric in METRICS.items():
        rows.append(
            (metric.label, [metric_cell(key, r.metrics, r.intervals, r.label_aware) for r in results])
        )
    paired = [r.paired for r in results if r.paired]
    if paired:
        baseline = paired[0]["baseline"]
        cells = ["baseline" if r.label == baseline else paired_text(r.paired) for r in results]
        rows.append((f"Δ policy pref. acc. vs {baseline} (pts)", cells))
    width = max(len(label) for label, _ in rows) + 2
    column_width = max(
        12, *(len(r.label) + 2 for r in results), *(len(c) + 2 for _, cells in rows for c in cells)
    )
    lines = ["".ljust(width) + "".join(r.label.rjust(column_width) for r in results)]
    lines += [label.ljust(width) + "".join(c.rjust(column_width) for c in cells) for label, cells in rows]
    lines += table_notes(results)
    return "\n".join(lines)


def metric_cell(
    key: str, metrics: dict[str, Any], intervals: dict[str, Any] | None, label_aware: bool
) -> str:
    """One metric of one model as shown: ``67.5% [62.1, 72.4]`` (a rate with its 95% interval, in %), ``+0.805``,
    with the asterisk of the label-aware metric."""
    metric = METRICS[key]
    text = metric.format(metrics.get(key))
    interval = (intervals or {}).get(key)
    if isinstance(interval, list | tuple) and len(interval) == 2 and all(_finite(x) for x in interval):
        text += f" [{interval[0] * 100:.1f}, {interval[1] * 100:.1f}]"
    if key == LABEL_AWARE_METRIC and label_aware:
        text += "*"
    return text


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def paired_text(paired: dict[str, Any] | None) -> str:
    """``+2.1 [-0.3, +4.5]``: the paired difference in percentage points with its 95% interval."""
    if not paired or not all(isinstance(paired.get(k), int | float) for k in ("difference", "low", "high")):
        return "—"
    if not math.isfinite(paired["low"]):
        return f"{paired['difference'] * 100:+.1f}"
    return f"{paired['difference'] * 100:+.1f} [{paired['low'] * 100:+.1f}, {paired['high'] * 100:+.1f}]"


def table_notes(results: Sequence[HeldOutMetrics]) -> list[str]:
    """What the table's marks mean, the paired differences in words, and differing training pair counts."""
    notes = []
    if any(result.intervals for result in results):
        notes.append("[low, high]: 95% Wilson interval, in %.")
    if any(result.label_aware for result in results):
        notes.append(f"* {LABEL_AWARE_NOTE}")
    paired = [result for result in results if result.paired]
    for result in paired:
        notes.append(paired_sentence(result.label, result.paired))
    if paired:
        notes.append(f"Δ (percentage points) is paired: {PAIRED_METHOD}.")
    counts = different_pair_counts([(r.label, r.trained_pairs, r.trained_drops) for r in results])
    if counts:
        notes.append(f"Not the same training data: {counts}.")
    return notes


def paired_sentence(label: str, paired: dict[str, Any]) -> str:
    """The paired difference in words: what it is, over how many pairs, and whether it tells anything."""
    baseline = paired.get("baseline", "?")
    low, high = paired.get("low", math.nan), paired.get("high", math.nan)
    if not (isinstance(low, int | float) and isinstance(high, int | float) and math.isfinite(low)):
        verdict = "too few pairs for an interval"
    elif low > 0:
        verdict = f"{label} is better"
    elif high < 0:
        verdict = f"{label} is worse"
    else:
        verdict = "the interval contains 0: no evidence of a difference"
    return (
        f"Δ {label} − {baseline}: {paired_text(paired)} points over {paired.get('pairs', '?')} shared pairs ({label} "
        f"alone right on {paired.get('better', '?')}, {baseline} alone on {paired.get('worse', '?')}): {verdict}."
    )


def different_pair_counts(
    counts: Sequence[tuple[str, Any, dict[str, int] | None]], done: str = "trained"
) -> str | None:
    """A sentence when models were trained (or evaluated) on different numbers of pairs, with the drops that
    explain it: for each smaller one, the reasons that dropped more of its pairs than of the largest's.

    ``counts``: (name, pairs, drops by reason, or None when not known: then no reason is given); counts that are
    not integers are left out. None when all agree.
    """
    known = sorted(((name, n, drops) for name, n, drops in counts if isinstance(n, int)), key=lambda e: e[1])
    if len({n for _, n, _ in known}) < 2:
        return None
    (first, first_n, _), *rest = known
    text = f"{first} {done} on {first_n} pairs, " + ", ".join(f"{name} on {n}" for name, n, _ in rest)
    largest_n, largest_drops = known[-1][1], known[-1][2]
    if any(drops is None for _, _, drops in known):
        return text
    reasons = []
    for name, n, drops in known:
        if n == largest_n:
            continue
        extra = {r: c - largest_drops.get(r, 0) for r, c in drops.items() if c > largest_drops.get(r, 0)}
        why = "; ".join(f"{r}: {c}" for r, c in extra.items()) or "no counted drop explains it: other data?"
        reasons.append(f"{name} has {largest_n - n} fewer ({why})")
    return f"{text}: {'; '.join(reasons)}"


def summary_drops(split_summary: dict[str, Any]) -> dict[str, int]:
    """A split's drops by reason, on load and by tokenization, from a run's ``data_summary.json`` entry."""
    drops: dict[str, int] = {}
    for key in ("dropped_on_load", "dropped_by_tokenization"):
        reasons = split_summary.get(key)
        for reason, count in reasons.items() if isinstance(reasons, dict) else ():
            if isinstance(count, int):  # a hand-edited summary's odd entry is left out, not a crash
                drops[reason] = drops.get(reason, 0) + count
    return drops
