"""Held-out metrics (docs/method.md §5) for any model against the cached references, side by side and fairly comparable.

Three accuracies answer three different questions:

- **policy preference accuracy** -- does the model itself prefer the chosen answer (``pw > pl``)? Needs no
  reference and no label-dependent weight, so it compares any runs; also given per token (length-normalised);
- **implicit reward accuracy against the initialising reference** -- ``(pw - l_1(y_w)) > (pl - l_1(y_l))``:
  comparable between DPO and MRPO runs that start from the same model;
- **implicit reward accuracy against the virtual reference** -- the quantity the paper's trainer reports
  (``rewards/accuracies``). With adaptive CTRO and K > 1 the virtual reference is built with knowledge of which
  answer is the chosen one, so this number *sees the label*; it is flagged ``label_aware``.
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

from mrpo.config import LossConfig, MRPOConfig
from mrpo.losses import mrpo_loss


@dataclass(frozen=True)
class Metric:
    label: str
    """What tables and plots call it."""
    kind: Literal["rate", "margin"]
    """A share in [0, 1] (shown as a percentage) or a mean margin in nats (shown signed)."""

    def format(self, value: Any) -> str:
        """``75.0%`` or ``+0.805``; ``—`` when there is no number."""
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            return "—"
        return f"{float(value):.1%}" if self.kind == "rate" else f"{float(value):+.3f}"


METRICS = {
    "policy_accuracy": Metric("policy pref. acc. (pw > pl)", "rate"),
    "policy_accuracy_per_token": Metric("policy pref. acc. per token", "rate"),
    "reward_accuracy_initialising": Metric("reward acc. vs initialising ref", "rate"),
    "reward_accuracy_virtual": Metric("reward acc. vs virtual ref", "rate"),
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
    virtual = mrpo_loss(pw, pl, rc, rr, **dataclasses.asdict(loss))
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
) -> HeldOutMetrics:
    """Score ``model`` on a prepared split (see ``pipeline.prepare_split``) and compute its metrics."""
    logps, tokens = score_split(
        model, prepared, label, batch_tokens=batch_tokens, show_progress=show_progress
    )
    return split_metrics(label, model_source, prepared, config.loss, logps, tokens)


def score_split(
    model, prepared, label: str = "model", *, batch_tokens: int = 8192, show_progress: bool = True
):
    """The model's sequence log-probs ``(N, 2)`` (chosen, rejected) and completion token counts ``(N, 2)`` on a
    prepared split, in the split's pair order."""
    from tqdm.auto import tqdm

    from mrpo.references import score_pairs

    dataset = prepared.dataset
    with tqdm(total=len(dataset), unit="pair", desc=f"evaluate {label}", disable=not show_progress) as bar:
        return score_pairs(model, prepared.views.policy, dataset.pairs, batch_tokens, bar.update)


def split_metrics(
    label: str,
    model_source: str,
    prepared,
    loss: LossConfig,
    logps: torch.Tensor,
    tokens: torch.Tensor,
    *,
    reference_rows: Sequence[int] | None = None,
) -> HeldOutMetrics:
    """The held-out metrics of a split from a model's log-probs on it (``score_split``), overall and by kind.

    ``reference_rows`` picks which of the split's cached reference columns the metrics are measured against (all,
    by default), so one scored split serves runs with different references.
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
    return HeldOutMetrics(
        label=label,
        model=model_source,
        pairs=len(dataset),
        metrics=metrics,
        label_aware=is_label_aware(loss, len(rows)),
        by_kind=by_kind,
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
    """A fixed-width table: one row per metric, one column per model."""
    width = max(len(metric.label) for metric in METRICS.values()) + 2
    columns = [result.label for result in results]
    column_width = max(12, *(len(c) + 2 for c in columns))
    lines = ["".ljust(width) + "".join(c.rjust(column_width) for c in columns)]
    lines.append("pairs".ljust(width) + "".join(str(r.pairs).rjust(column_width) for r in results))
    for key, metric in METRICS.items():
        cells = []
        for result in results:
            text = metric.format(result.metrics[key])
            if key == LABEL_AWARE_METRIC and result.label_aware:
                text += "*"
            cells.append(text.rjust(column_width))
        lines.append(metric.label.ljust(width) + "".join(cells))
    if any(result.label_aware for result in results):
        lines.append(f"* {LABEL_AWARE_NOTE}")
    return "\n".join(lines)
