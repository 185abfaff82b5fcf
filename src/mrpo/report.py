"""Plots (PNG) and a markdown summary (``report.md``) of one or several training runs: ``mrpo report RUN_DIR...``.

A run directory is what ``mrpo train`` writes (``training.output_dir``): ``metrics.jsonl`` (required: one JSON
object per Trainer log line), and, when present, ``eval_results.json`` (``mrpo evaluate``), ``data_summary.json``,
``mrpo_config.yaml``, ``diagnostics.jsonl`` (live warnings) and ``inspect.json`` (``mrpo inspect``). Several runs share every plot, one colour per run, so a DPO run and an MRPO run started
from the same model compare at a glance.

The CTRO clip rate comes first in the summary: when the references are of different families, adaptive CTRO can
clip most external log-probs into a narrow band around the initialising reference's, and MRPO then trains almost
exactly like DPO. The report grades each run's mean clip rate on one scale (``clip_severity``); a K = 1 run is DPO
and gets no CTRO figures at all.

    report = write_report([Path("runs/dpo"), Path("runs/mrpo")], Path("runs/report"))   # -> runs/report/report.md
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mrpo.audit_forecast import PARTIAL_CLIP_RATE, SATURATED_CLIP_RATE, clip_severity
from mrpo.errors import ReportError
from mrpo.formatting import is_number, percent, plain, signed
from mrpo.plots import curve_plots, plot_curves, plot_held_out
from mrpo.report_tables import (
    HeldOutModel,
    held_out_models,
    held_out_section,
    markdown_table,
)
from mrpo.rundir import (
    CONFIG_FILE,
    DATA_SUMMARY_FILE,
    REPORT_FILE,
    Run,
    load_run,
)


def _unique_names(runs: list[Run]) -> None:
    """Runs whose directories share a name are named by as many trailing path parts as tell them apart."""
    parts = [run.path.resolve().parts for run in runs]
    for index, run in enumerate(runs):
        for depth in range(1, len(parts[index]) + 1):
            name = "/".join(parts[index][-depth:])
            if sum("/".join(other[-depth:]) == name for other in parts) == 1:
                break
        run.name = name


def _clip_section(runs: Sequence[Run], models: Sequence[HeldOutModel]) -> list[str]:
    multi = [run for run in runs if run.num_references != 1]
    lines = ["## CTRO clip rate — read this first", ""]
    lines += [
        f"- `{run.name}`: K = 1: DPO (one reference: no CTRO, no alpha)." for run in runs if run not in multi
    ]
    if not multi:
        return lines + [""]
    if len(multi) < len(runs):
        lines.append("")
    lines.append(
        "Share of the external references' log-probs that the trust region moved (CTRO): the more it moves, the "
        f"less the external references count. Graded in the column *external references*: below {PARTIAL_CLIP_RATE:.0%} "
        f'"{clip_severity(0)}", from {PARTIAL_CLIP_RATE:.0%} "{clip_severity(PARTIAL_CLIP_RATE)}", from {SATURATED_CLIP_RATE:.0%} '
        f'"{clip_severity(SATURATED_CLIP_RATE)}".'
    )
    lines.append("")
    rows, warnings_text = [], []
    for run in multi:
        loss = (run.config or {}).get("loss")
        clip = loss.get("clip", "?") if isinstance(loss, dict) else "?"
        mean = run.mean_clip_rate()
        held_out = ", ".join(
            f"{model.name} {percent(model.result['metrics'].get('clip_rate'))}"
            for model in models
            if model.run == run.name
        )
        last_train = run.series("ctro/clip_rate")[1]
        last_eval = run.series("eval_ctro/clip_rate")[1]
        rows.append(
            [
                run.name,
                str(run.num_references or "?"),
                str(clip),
                "—"
                if mean is None
                else f"**{percent(mean[0])}**" + ("" if mean[1] == "train" else f" ({mean[1]})"),
                "—" if mean is None else clip_severity(mean[0]),
                percent(last_train[-1]) if last_train else "—",
                percent(last_eval[-1]) if last_eval else "—",
                held_out or "—",
            ]
        )
        if mean and mean[0] >= PARTIAL_CLIP_RATE:
            warnings_text.append(_clip_warning(run.name, *mean))
    lines += markdown_table(
        ["run", "references (K)", "clip", "mean clip rate", "external references", "last (train)", "last (eval)",
         "held-out"],
        rows,
    )  # fmt: skip
    if warnings_text:
        lines += [""] + [line for text in warnings_text for line in (text, "")][:-1]
    return lines + [""]


def _clip_warning(name: str, rate: float, split: str) -> str:
    severity = clip_severity(rate)
    mark = "⚠️ " if rate >= SATURATED_CLIP_RATE else ""
    return (
        f"> {mark}**{name}: CTRO clipped {rate:.0%} of the external references' log-probs on average ({split}) — "
        f"{severity}.** Clipped log-probs sit in a narrow band around the initialising "
        "reference's, so they barely move the virtual reference. This happens when the references come from "
        "different model families (their sequence log-probs differ by several nats). Compare it with a plain DPO "
        "run before crediting the extra references (the paired difference of `mrpo evaluate`); consider "
        "`loss.align=pair`, a wider `loss.eps` or `loss.clip=off`."
    )


def _pair_count_lines(runs: Sequence[Run]) -> list[str]:
    """A warning when the runs trained (or evaluated during training) on different numbers of pairs, from their
    data summaries: a reference whose tokenizer drops pairs the others keep changes the data, not only the loss."""
    from mrpo.evaluation import different_pair_counts, summary_drops

    notes = []
    for split, done in (("train", "trained"), ("eval", "evaluated during training")):
        summaries = [(run.name, (run.data_summary or {}).get(split)) for run in runs]
        counts = [
            (name, s.get("pairs_used"), summary_drops(s)) for name, s in summaries if isinstance(s, dict)
        ]
        text = different_pair_counts(counts, done)
        if text:
            notes.append(f"> ⚠️ **Not the same {split} pairs:** {text}.")
    return [line for note in notes for line in (note, "")]


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
                        f"{percent(agreement.get('value'))} [{percent(agreement.get('low'))}, "
                        f"{percent(agreement.get('high'))}]",
                        signed(ref.get("mean_margin")),
                        "—" if ref.get("level_gap") is None else signed(ref.get("level_gap")),
                        "—" if ref.get("clip_rate") is None else percent(ref.get("clip_rate")),
                        plain(ref.get("alpha_mean")),
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


_TRAIN_ROWS: list[tuple[str, str, Callable[[float, float], bool] | None, Callable[[Any], str]]] = [
    ("loss", "loss", lambda a, b: a < b, plain),
    ("reward accuracy", "rewards/accuracies", lambda a, b: a > b, percent),
    ("reward margin", "rewards/margins", lambda a, b: a > b, signed),
    ("CTRO clip rate", "ctro/clip_rate", None, percent),
    ("eps chosen", "ctro/eps_chosen", None, plain),
    ("eps rejected", "ctro/eps_rejected", None, plain),
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
    for key in run.alpha_keys() if run.num_references != 1 else []:
        k = int(key.rsplit("ref", 1)[1])
        name = run.reference_name(k)
        alpha_rows.append((f"alpha ref{k}" + (f" ({name})" if name else ""), key, None, plain))
    for label, key, better, fmt in _TRAIN_ROWS + alpha_rows:
        if run.num_references == 1 and key.startswith("ctro/"):
            continue  # K = 1: DPO; a run from before this rule logged CTRO figures that mean nothing
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
    lines += _pair_count_lines(runs)
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
    lines += held_out_section(runs, models, plotted_held_out)
    lines += ["## Runs", ""]
    for run in runs:
        lines += _run_section(run)
    report = output_dir / REPORT_FILE
    report.write_text("\n".join(lines).rstrip("\n") + "\n", encoding="utf-8")
    return report
