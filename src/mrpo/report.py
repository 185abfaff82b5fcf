"""Plots (PNG) and a markdown summary (``report.md``) of one or several training runs: ``mrpo report RUN_DIR...``.

A run directory is what ``mrpo train`` writes (``training.output_dir``): ``metrics.jsonl`` (required: one JSON
object per Trainer log line), and, when present, ``eval_results.json`` (``mrpo evaluate``), ``data_summary.json``,
``mrpo_config.yaml``, ``diagnostics.jsonl`` (live warnings) and ``inspect.json`` (``mrpo inspect``). Several runs share every plot, one colour per run, so a DPO run and an MRPO run started
from the same model compare at a glance.

The CTRO clip rate comes first in the summary: when the references are of different families, adaptive CTRO can
clip most external log-probs into a narrow band around the initialising reference's, and MRPO then trains almost
exactly like DPO. The report says so when a run's mean clip rate is above ``CLIP_RATE_WARNING``.

    report = write_report([Path("runs/dpo"), Path("runs/mrpo")], Path("runs/report"))   # -> runs/report/report.md
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mrpo.errors import ReportError
from mrpo.plots import curve_plots, plot_curves, plot_held_out
from mrpo.rundir import (
    CONFIG_FILE,
    DATA_SUMMARY_FILE,
    EVAL_RESULTS_FILE,
    REPORT_FILE,
    Run,
    is_number,
    load_run,
)

CLIP_RATE_WARNING = 0.5
"""A mean clip rate above this gets a warning: the external references then barely move the virtual reference."""


def _unique_names(runs: list[Run]) -> None:
    """Runs whose directories share a name are named by as many trailing path parts as tell them apart."""
    parts = [run.path.resolve().parts for run in runs]
    for index, run in enumerate(runs):
        for depth in range(1, len(parts[index]) + 1):
            name = "/".join(parts[index][-depth:])
            if sum("/".join(other[-depth:]) == name for other in parts) == 1:
                break
        run.name = name


@dataclass
class HeldOutModel:
    """One model's column in the held-out comparison."""

    name: str
    run: str
    result: dict[str, Any]


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
            models.append(HeldOutModel(str(result.get("label", "?")), run.name, result))
    labels = [model.name for model in models]
    for model in models:
        if labels.count(model.name) > 1:
            model.name = f"{model.run}/{model.name}"
    return models


def _same_result(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("label", "model", "pairs", "metrics", "label_aware")
    return all(a.get(key) == b.get(key) for key in keys)


# ----------------------------------------------------------------------------------------------------------------
# The markdown summary
# ----------------------------------------------------------------------------------------------------------------


def _percent(value: Any) -> str:
    return f"{float(value):.1%}" if is_number(value) else "—"


def _signed(value: Any) -> str:
    return f"{float(value):+.3f}" if is_number(value) else "—"


def _plain(value: Any) -> str:
    return f"{float(value):.4g}" if is_number(value) else "—"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    escape = lambda cell: str(cell).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(escape(cell) for cell in header) + " |"]
    lines.append("|" + "|".join(["---"] * len(header)) + "|")
    lines += ["| " + " | ".join(escape(cell) for cell in row) + " |" for row in rows]
    return lines


def _clip_section(runs: Sequence[Run], models: Sequence[HeldOutModel]) -> list[str]:
    lines = ["## CTRO clip rate — read this first", ""]
    lines.append(
        "Share of the external references' log-probs that the trust region moved (CTRO). A high rate means the "
        "external references barely move the virtual reference: the run then trains almost exactly like DPO "
        "against the initialising reference."
    )
    lines.append("")
    rows = []
    warnings_text = []
    for run in runs:
        k = run.num_references
        loss = (run.config or {}).get("loss")
        clip = loss.get("clip", "?") if isinstance(loss, dict) else "?"
        mean = run.mean_clip_rate()
        held_out = ", ".join(
            f"{model.name} {_percent(model.result['metrics'].get('clip_rate'))}"
            for model in models
            if model.run == run.name
        )
        last_train = run.series("ctro/clip_rate")[1]
        last_eval = run.series("eval_ctro/clip_rate")[1]
        if k == 1:
            rows.append(
                [
                    run.name,
                    "1",
                    str(clip),
                    "— (one reference: nothing to clip; this is DPO)",
                    "—",
                    "—",
                    held_out or "—",
                ]
            )
            continue
        rows.append(
            [
                run.name,
                str(k) if k else "?",
                str(clip),
                "—"
                if mean is None
                else f"**{_percent(mean[0])}**" + ("" if mean[1] == "train" else f" ({mean[1]})"),
                _percent(last_train[-1]) if last_train else "—",
                _percent(last_eval[-1]) if last_eval else "—",
                held_out or "—",
            ]
        )
        if mean and mean[0] > CLIP_RATE_WARNING:
            warnings_text.append(
                f"> ⚠️ **{run.name}: CTRO clipped {mean[0]:.0%} of the external references' log-probs on average "
                f"({mean[1]}).** Their log-probs were pulled into a narrow band around the initialising reference's, "
                "so they barely move the virtual reference: this run is close to **DPO in disguise**. This happens "
                "when the references come from different model families (their sequence log-probs differ by "
                "several nats). Compare it with a plain DPO run before crediting the extra references; consider "
                "`loss.align=pair`, a wider `loss.eps` or `loss.clip=off`."
            )
    lines += markdown_table(
        ["run", "references (K)", "clip", "mean clip rate", "last (train)", "last (eval)", "held-out"], rows
    )
    if warnings_text:
        lines += [""] + [line for text in warnings_text for line in (text, "")][:-1]
    return lines + [""]


def _audit_section(runs: Sequence[Run]) -> list[str]:
    """What `mrpo inspect` forecast for each run that has an inspect.json, train split first."""
    audited = [run for run in runs if run.audit and isinstance(run.audit.get("splits"), list)]
    if not audited:
        return []
    lines = ["## Reference audit (`mrpo inspect`, before training)", ""]
    for run in audited:
        for split in run.audit["splits"]:
            if not isinstance(split, dict):
                continue
            lines += [
                f"**{run.name}**, {split.get('split', '?')} split ({split.get('pairs', '?')} pairs):",
                "",
            ]
            rows = []
            for ref in split.get("references", []):
                agreement = ref.get("label_agreement") or {}
                rows.append(
                    [
                        f"{ref.get('index')} {ref.get('name')}",
                        f"{_percent(agreement.get('value'))} [{_percent(agreement.get('low'))}, "
                        f"{_percent(agreement.get('high'))}]",
                        _signed(ref.get("mean_margin")),
                        "—" if ref.get("level_gap") is None else _signed(ref.get("level_gap")),
                        "—" if ref.get("clip_rate") is None else _percent(ref.get("clip_rate")),
                        _plain(ref.get("alpha_mean")),
                    ]
                )
            lines += markdown_table(
                ["reference", "agrees with labels [95% CI]", "mean margin", "level gap (nats)", "clip forecast",
                 "mean alpha"],
                rows,
            )  # fmt: skip
            lines += [""] + [f"- {sentence}" for sentence in split.get("verdict", [])] + [""]
    return lines


def _diagnostics_section(runs: Sequence[Run]) -> list[str]:
    lines = ["## Live diagnostics", ""]
    rows = [
        [
            run.name,
            str(d.get("step", "?")),
            str(d.get("condition", "?")),
            f"{d.get('message', '')} {d.get('remedy', '')}",
        ]
        for run in runs
        for d in run.diagnostics
    ]
    if not rows:
        return lines + ["No warning fired during training (or the runs predate live diagnostics).", ""]
    lines += ["Each warning fired once, at the step shown; the curves mark it with a dotted line.", ""]
    return lines + markdown_table(["run", "step", "condition", "what and what to do"], rows) + [""]


def _held_out_section(models: Sequence[HeldOutModel], plotted: bool) -> list[str]:
    from mrpo.evaluation import LABEL_AWARE_METRIC, LABEL_AWARE_NOTE, METRICS

    lines = ["## Held-out metrics", ""]
    if not models:
        return lines + [
            f"No run has an {EVAL_RESULTS_FILE} (run `mrpo evaluate CONFIG` to add held-out metrics).",
            "",
        ]
    any_label_aware = any(model.result.get("label_aware") for model in models)
    rows = [["pairs", *(str(model.result.get("pairs", "—")) for model in models)]]
    for key, metric in METRICS.items():
        cells = []
        for model in models:
            text = metric.format(model.result["metrics"].get(key))
            if key == LABEL_AWARE_METRIC and model.result.get("label_aware"):
                text += "*"
            cells.append(text)
        rows.append([metric.label, *cells])
    lines += markdown_table(["metric", *(model.name for model in models)], rows)
    if any_label_aware:
        lines += ["", f"\\* {LABEL_AWARE_NOTE} It is not comparable between runs."]
    kinds = sorted({kind for model in models for kind in (model.result.get("by_kind") or {})})
    if kinds:
        lines += ["", "Policy preference accuracy by kind of pair:", ""]
        kind_rows = [
            [
                kind,
                *(
                    _percent((model.result.get("by_kind") or {}).get(kind, {}).get("policy_accuracy"))
                    for model in models
                ),
            ]
            for kind in kinds
        ]
        lines += markdown_table(["kind", *(model.name for model in models)], kind_rows)
    sources = sorted({f"`{model.name}`: {model.result.get('model', '?')}" for model in models})
    lines += ["", "Models: " + "; ".join(sources) + "."]
    if plotted:
        lines += ["", "![Held-out metrics](heldout.png)"]
    return lines + [""]


_TRAIN_ROWS: list[tuple[str, str, Callable[[float, float], bool] | None, Callable[[Any], str]]] = [
    ("loss", "loss", lambda a, b: a < b, _plain),
    ("reward accuracy", "rewards/accuracies", lambda a, b: a > b, _percent),
    ("reward margin", "rewards/margins", lambda a, b: a > b, _signed),
    ("CTRO clip rate", "ctro/clip_rate", None, _percent),
    ("eps chosen", "ctro/eps_chosen", None, _plain),
    ("eps rejected", "ctro/eps_rejected", None, _plain),
]


def _final_and_best(run: Run, key: str, better, fmt) -> tuple[str, str]:
    steps, values = run.series(key)
    if not values:
        return "—", "—"
    final = fmt(values[-1])
    if better is None:
        return final, "—"
    best = 0
    for i, value in enumerate(values):
        if better(value, values[best]):
            best = i
    return final, f"{fmt(values[best])} (step {int(steps[best])})"


def _run_section(run: Run) -> list[str]:
    lines = [f"### {run.name}", "", f"Directory: `{run.path}`  "]
    if run.summary:
        parts = [f"{int(run.summary.get('step', 0))} steps"]
        if is_number(run.summary.get("train_runtime")):
            parts.append(f"{run.summary['train_runtime']:.0f} s")
        mean_loss = run.mean_train_loss()
        if mean_loss is not None:
            parts.append(f"mean train loss {mean_loss:.4g}")
        lines.append(f"Finished: {', '.join(parts)}.  ")
    else:
        last = run.train[-1]["step"] if run.train else run.eval[-1]["step"]
        lines.append(f"Not finished (no end-of-training line): last logged step {last}.  ")
    lines += [f"Note: {note}  " for note in run.notes]
    lines += ["", "Training metrics (final value, and best value with its step):", ""]
    rows = []
    alpha_rows = []
    for key in run.alpha_keys():
        k = int(key.rsplit("ref", 1)[1])
        name = run.reference_name(k)
        alpha_rows.append((f"alpha ref{k}" + (f" ({name})" if name else ""), key, None, _plain))
    for label, key, better, fmt in _TRAIN_ROWS + alpha_rows:
        train_final, train_best = _final_and_best(run, key, better, fmt)
        eval_final, eval_best = _final_and_best(run, f"eval_{key}", better, fmt)
        if {train_final, eval_final} != {"—"}:
            rows.append([label, train_final, train_best, eval_final, eval_best])
    lines += markdown_table(["metric", "train final", "train best", "eval final", "eval best"], rows)
    lines += [""] + _data_lines(run) + [""] + _config_lines(run)
    return lines + [""]


def _data_lines(run: Run) -> list[str]:
    if not run.data_summary:
        return [f"Data: no {DATA_SUMMARY_FILE}."]
    rows = []
    for split, summary in run.data_summary.items():
        if not isinstance(summary, dict):
            continue
        rows.append(
            [
                split,
                f"`{summary.get('source', '?')}`",
                str(summary.get("rows_read", "—")),
                str(summary.get("pairs_loaded", "—")),
                f"**{summary.get('pairs_used', '—')}**",
                _counts(summary.get("dropped_on_load")),
                _counts(summary.get("dropped_by_tokenization")),
            ]
        )
    return ["Data:", ""] + markdown_table(
        [
            "split",
            "source",
            "rows read",
            "pairs loaded",
            "pairs used",
            "dropped on load",
            "dropped by tokenization",
        ],
        rows,
    )


def _counts(counts: Any) -> str:
    if not isinstance(counts, dict) or not counts:
        return "0"
    total = sum(value for value in counts.values() if isinstance(value, int))
    return f"{total} (" + ", ".join(f"{reason}: {n}" for reason, n in counts.items()) + ")"


def _config_lines(run: Run) -> list[str]:
    if run.config_text is None:
        return [f"Config: no {CONFIG_FILE}."]
    lines = []
    config = run.config or {}
    policy, loss, lora = config.get("policy"), config.get("loss"), config.get("lora")
    if isinstance(policy, dict):
        lines.append(
            f"Policy: `{policy.get('model')}`"
            + (", LoRA" if isinstance(lora, dict) and lora.get("enabled") else ", full fine-tuning")
        )
    references = config.get("references")
    if isinstance(references, list):
        names = [f"`{r.get('name')}` ({r.get('model')})" for r in references if isinstance(r, dict)]
        lines.append(f"References (K = {len(names)}): " + ", ".join(names))
    if isinstance(loss, dict):
        lines.append("Loss: " + ", ".join(f"{key}={value}" for key, value in loss.items()))
    lines = [line + "  " for line in lines]
    text = run.config_text.rstrip("\n").replace("```", "ʼʼʼ")
    return lines + [
        "",
        f"<details><summary>Resolved config ({CONFIG_FILE})</summary>",
        "",
        "```yaml",
        text,
        "```",
        "",
        "</details>",
    ]


# ----------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------


def write_report(run_dirs: Sequence[str | Path], output_dir: str | Path | None = None) -> Path:
    """Write the plots and ``report.md`` for the runs; returns the path of ``report.md``.

    Args:
        run_dirs: one or several run directories (``training.output_dir`` of ``mrpo train``).
        output_dir: where to write; default: the run directory itself for one run, ``./report`` for several.
    """
    if not run_dirs:
        raise ReportError("no run directory given")
    runs = [load_run(run_dir) for run_dir in run_dirs]
    _unique_names(runs)
    if output_dir is None:
        output_dir = Path(run_dirs[0]) if len(runs) == 1 else Path("report")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    models = held_out_models(runs)

    images: list[tuple[str, str]] = []
    missing: list[str] = []
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        missing.append(
            "all plots: matplotlib is not installed (`pip install 'mrpo[eval]'` or `pip install matplotlib`)"
        )
        plotted_held_out = False
    else:
        for file_name, (title, panels) in curve_plots(runs).items():
            if plot_curves(runs, panels, output_dir / file_name, title):
                images.append((title, file_name))
            else:
                missing.append(
                    f"{file_name}: no run logged {', '.join(c.key for p in panels for c in p.curves) or 'alpha/ref*'}"
                )
        plotted_held_out = plot_held_out(models, output_dir / "heldout.png")

    from mrpo import __version__

    lines = ["# MRPO report", ""]
    lines.append(f"Runs: {', '.join(f'`{run.name}`' for run in runs)} — written by mrpo {__version__}.")
    lines.append("")
    lines += _clip_section(runs, models)
    lines += _audit_section(runs)
    lines += _diagnostics_section(runs)
    lines += ["## Training curves", ""]
    if len(runs) > 1:
        lines += [
            "One colour per run; solid lines are training, dashed lines held-out evaluation during training.",
            "",
        ]
    lines += [f"![{title}]({file_name})" for title, file_name in images]
    if missing:
        lines += ["", "Not plotted:"] + [f"- {reason}" for reason in missing]
    lines.append("")
    lines += _held_out_section(models, plotted_held_out)
    lines += ["## Runs", ""]
    for run in runs:
        lines += _run_section(run)
    report = output_dir / REPORT_FILE
    report.write_text("\n".join(lines).rstrip("\n") + "\n", encoding="utf-8")
    return report
