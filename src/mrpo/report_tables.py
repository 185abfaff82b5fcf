"""The tables of ``mrpo report``: markdown (its cells written by ``mrpo.formatting``) and the held-out section
(each run's evaluated models side by side with their 95% intervals and paired differences, the training's own last
evaluation, what to run when a run has no ``eval_results.json``, and a note when the models were not evaluated on
the same pairs)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mrpo.formatting import percent, plain, signed
from mrpo.rundir import CONFIG_FILE, EVAL_RESULTS_FILE, FINAL_DIR, Run

# ----------------------------------------------------------------------------------------------------------------
# Cells and tables
# ----------------------------------------------------------------------------------------------------------------


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    escape = lambda cell: str(cell).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(escape(cell) for cell in header) + " |"]
    lines.append("|" + "|".join(["---"] * len(header)) + "|")
    lines += ["| " + " | ".join(escape(cell) for cell in row) + " |" for row in rows]
    return lines


# ----------------------------------------------------------------------------------------------------------------
# The held-out section
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class HeldOutModel:
    """One model's column in the held-out comparison."""

    name: str
    run: str
    result: dict[str, Any]
    references: int = 0
    """K of the run it was evaluated in (0 when unknown)."""


def held_out_models(runs: Sequence[Run]) -> list[HeldOutModel]:
    """Every run's evaluated models; the same model with identical results in several runs (the shared "start")
    appears once. Names are the evaluated labels, prefixed with the run where two runs use the same label."""
    models: list[HeldOutModel] = []
    for run in runs:
        for result in (run.eval_results or {}).get("models", []):
            if not isinstance(result, dict) or not isinstance(result.get("metrics"), dict):
                continue
            if any(_same_result(result, other.result) for other in models):
                continue
            models.append(HeldOutModel(str(result.get("label", "?")), run.name, result, _evaluated_k(run)))
    labels = [model.name for model in models]
    for model in models:
        if labels.count(model.name) > 1:
            model.name = f"{model.run}/{model.name}"
    return models


def _evaluated_k(run: Run) -> int:
    references = (run.eval_results or {}).get("references")
    return len(references) if isinstance(references, list) else run.num_references


def _same_result(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("label", "model", "pairs", "metrics", "label_aware")
    return all(a.get(key) == b.get(key) for key in keys)


def held_out_section(runs: Sequence[Run], models: Sequence[HeldOutModel], plotted: bool) -> list[str]:
    lines = ["## Held-out metrics", ""]
    missing = [run for run in runs if not (run.eval_results or {}).get("models")]
    for run in missing:
        lines.append(
            f"- `{run.name}`: no held-out results (no {EVAL_RESULTS_FILE} in `{run.path}`): {_evaluate_hint(run)}"
        )
    if missing:
        lines.append("")
    lines += _training_eval_lines([run for run in missing if run.eval])
    if not models:
        return lines
    caption = [f"The other runs, from `mrpo evaluate` ({EVAL_RESULTS_FILE}):", ""] if missing else []
    return lines + caption + _held_out_table(models, plotted)


def _evaluate_hint(run: Run) -> str:
    config = run.path / CONFIG_FILE if run.config_text is not None else "CONFIG"
    command = (
        f"`mrpo evaluate {config} --checkpoint {run.path.name}={run.path / FINAL_DIR} "
        f"--output {run.path / EVAL_RESULTS_FILE}`"
    )
    unfinished = (
        "" if (run.path / FINAL_DIR).exists() else f" (no {FINAL_DIR}/ yet: name a checkpoint-N instead)"
    )
    return f"run {command}{unfinished}."


def _training_eval_lines(runs: Sequence[Run]) -> list[str]:
    """The last eval line each run's training logged (the Trainer's loss and implicit rewards on the eval split)."""
    if not runs:
        return []
    from mrpo.evaluation import LABEL_AWARE_NOTE

    lines = [
        "Meanwhile, what the training's own evaluation logged (metrics.jsonl, last eval line): the loss and the "
        "implicit rewards against the run's virtual reference, not `mrpo evaluate`'s policy accuracies.",
        "",
    ]
    rows: list[list[str]] = [[label] for label in ("step", "pairs", "eval loss", "reward accuracy", "reward margin",
                                                   "CTRO clip rate")]  # fmt: skip
    for run in runs:
        last = run.eval[-1]
        eval_summary = (run.data_summary or {}).get("eval")
        pairs = eval_summary.get("pairs_used") if isinstance(eval_summary, dict) else None
        aware = (
            run.num_references > 1
            and ((run.config or {}).get("loss") or {}).get("clip", "adaptive") == "adaptive"
        )
        cells = [str(last["step"]), str(pairs if pairs is not None else "—"), plain(last.get("eval_loss")),
                 percent(last.get("eval_rewards/accuracies")) + ("*" if aware else ""),
                 signed(last.get("eval_rewards/margins")),
                 "— (K = 1)" if run.num_references == 1 else percent(last.get("eval_ctro/clip_rate"))]  # fmt: skip
        for row, cell in zip(rows, cells, strict=True):
            row.append(cell)
    lines += markdown_table(["", *(run.name for run in runs)], rows)
    if any(row.endswith("*") for row in rows[3][1:]):
        lines += ["", f"\\* {LABEL_AWARE_NOTE}"]
    return lines + [""]


def _held_out_table(models: Sequence[HeldOutModel], plotted: bool) -> list[str]:
    from mrpo.evaluation import (
        LABEL_AWARE_NOTE,
        METRICS,
        different_pair_counts,
        metric_cell,
        paired_sentence,
        paired_text,
    )

    lines = []
    rows = [["pairs", *(str(model.result.get("pairs", "—")) for model in models)]]
    if any(model.result.get("trained_pairs") is not None for model in models):
        rows.append(["trained on (pairs)", *(str(m.result.get("trained_pairs") or "—") for m in models)])
    for key, metric in METRICS.items():
        cells = [
            "— (K = 1)" if key == "clip_rate" and model.references == 1
            else metric_cell(key, model.result["metrics"], model.result.get("intervals"), bool(model.result.get("label_aware")))
            for model in models
        ]  # fmt: skip
        rows.append([metric.label, *cells])
    paired = [model for model in models if isinstance(model.result.get("paired"), dict)]
    if paired:
        baselines = {(m.run, m.result["paired"].get("baseline")) for m in paired}
        cells = [
            "baseline" if (m.run, m.result.get("label")) in baselines else paired_text(m.result.get("paired"))
            for m in models
        ]
        rows.append(["Δ policy pref. acc. vs baseline (pts)", *cells])
    lines += markdown_table(["metric", *(model.name for model in models)], rows)
    notes = []
    if any(model.result.get("intervals") for model in models):
        notes.append("[low, high]: 95% Wilson interval, in %.")
    if any(model.result.get("label_aware") for model in models):
        notes.append(f"\\* {LABEL_AWARE_NOTE} It is not comparable between runs.")
    notes += [paired_sentence(m.name, m.result["paired"]) for m in paired]
    evaluated = different_pair_counts(
        [(m.name, m.result.get("pairs"), None) for m in models], done="evaluated"
    )
    if evaluated:
        notes.append(f"Not the same held-out pairs: {evaluated}; compare these columns only roughly.")
    lines += [""] + [f"- {note}" for note in notes] if notes else []
    lines += _by_kind_lines(models)
    sources = sorted({f"`{model.name}`: {model.result.get('model', '?')}" for model in models})
    lines += ["", "Models: " + "; ".join(sources) + "."]
    if plotted:
        lines += ["", "![Held-out metrics](heldout.png)"]
    return lines + [""]


def _by_kind_lines(models: Sequence[HeldOutModel]) -> list[str]:
    kinds = sorted({kind for model in models for kind in (model.result.get("by_kind") or {})})
    if not kinds:
        return []
    rows = [
        [
            kind,
            *(percent((m.result.get("by_kind") or {}).get(kind, {}).get("policy_accuracy")) for m in models),
        ]
        for kind in kinds
    ]
    return ["", "Policy preference accuracy by kind of pair:", ""] + markdown_table(
        ["kind", *(model.name for model in models)], rows
    )
