"""The figures of ``mrpo report`` (PNG, on matplotlib's Agg canvas: no display, no global pyplot state):
training curves of one or several runs, with each live warning marked where it fired, and held-out bars."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mrpo.formatting import is_number
from mrpo.rundir import Run

if TYPE_CHECKING:
    from mrpo.report_tables import HeldOutModel


@dataclass
class Curve:
    """One logged metric drawn in a panel: its key, line style and legend text."""

    key: str
    style: str
    label: str


@dataclass
class Panel:
    title: str
    ylabel: str
    curves: list[Curve]
    unit_interval: bool = False
    """Values are rates in [0, 1]."""
    multi_reference: bool = False
    """Drawn only for runs with more than one reference: at K = 1 (DPO) alpha is 1 and CTRO has nothing to clip."""

    def shows(self, run: Run) -> bool:
        return not (self.multi_reference and run.num_references == 1)


def _figure(panels: int):
    """A matplotlib Figure on the Agg canvas (no pyplot: no global backend state, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.2 * panels, 3.8), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, [figure.add_subplot(1, panels, i + 1) for i in range(panels)]


def plot_curves(runs: Sequence[Run], panels: Sequence[Panel], path: Path, title: str) -> bool:
    """Draw each panel's curves for every run (colour = run, line style = curve); False if nothing was logged."""
    panels = [
        panel
        for panel in panels
        if any(panel.shows(run) and run.has(curve.key) for run in runs for curve in panel.curves)
    ]
    if not panels:
        return False
    from matplotlib.ticker import MaxNLocator

    figure, axes = _figure(len(panels))
    figure.suptitle(title)
    for ax, panel in zip(axes, panels, strict=True):
        for index, run in enumerate(runs):
            for curve in panel.curves:
                steps, values = run.series(curve.key) if panel.shows(run) else ([], [])
                if not steps:
                    continue
                label = curve.label if len(runs) == 1 else f"{run.name}: {curve.label}"
                marker = "o" if len(steps) <= 25 else None
                ax.plot(
                    steps,
                    values,
                    curve.style,
                    color=f"C{index % 10}",
                    marker=marker,
                    markersize=3,
                    label=label,
                )
        for index, run in enumerate(runs):  # each live warning where it fired
            for diagnostic in run.diagnostics:
                step = diagnostic.get("step")
                if isinstance(step, int) and step > 0:
                    ax.axvline(step, color=f"C{index % 10}", linestyle=":", linewidth=1, alpha=0.8)
                    ax.annotate(
                        str(diagnostic.get("condition", "?")).split("/")[0],
                        (step, 1),
                        xycoords=("data", "axes fraction"),
                        rotation=90,
                        va="top",
                        ha="right",
                        fontsize="x-small",
                        color=f"C{index % 10}",
                    )
        ax.set_title(panel.title)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(panel.ylabel)
        if panel.unit_interval:
            ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    figure.savefig(path, dpi=100)
    return True


def curve_plots(runs: Sequence[Run]) -> dict[str, tuple[str, list[Panel]]]:
    """File name -> (title, panels) of every line plot."""
    max_references = max(len(run.alpha_keys()) for run in runs)
    alpha_panels = []
    for k in range(1, max_references + 1):
        names = {run.reference_name(k) for run in runs} - {None}
        name = f" ({names.pop()})" if len(names) == 1 else ""
        curves = [Curve(f"alpha/ref{k}", "-", "train"), Curve(f"eval_alpha/ref{k}", "--", "eval")]
        alpha_panels.append(
            Panel(f"reference {k}{name}", "alpha", curves, unit_interval=True, multi_reference=True)
        )
    return {
        "loss.png": (
            "Training loss",
            [Panel("loss", "loss", [Curve("loss", "-", "train"), Curve("eval_loss", "--", "eval")])],
        ),
        "rewards.png": (
            "Implicit rewards (vs the virtual reference)",
            [
                Panel(
                    "reward accuracy",
                    "accuracy",
                    [
                        Curve("rewards/accuracies", "-", "train"),
                        Curve("eval_rewards/accuracies", "--", "eval"),
                    ],
                    unit_interval=True,
                ),
                Panel(
                    "reward margin",
                    "margin",
                    [Curve("rewards/margins", "-", "train"), Curve("eval_rewards/margins", "--", "eval")],
                ),
            ],
        ),
        "alpha.png": ("Reference weights alpha", alpha_panels),
        "ctro.png": (
            "CTRO trust region",
            [
                Panel(
                    "eps",
                    "eps (relative half-width of the band)",
                    [
                        Curve("ctro/eps_chosen", "-", "eps chosen"),
                        Curve("ctro/eps_rejected", ":", "eps rejected"),
                    ],
                    multi_reference=True,
                ),
                Panel(
                    "clip rate",
                    "share of external log-probs clipped",
                    [Curve("ctro/clip_rate", "-", "train"), Curve("eval_ctro/clip_rate", "--", "eval")],
                    unit_interval=True,
                    multi_reference=True,
                ),
            ],
        ),
    }


def plot_held_out(models: Sequence[HeldOutModel], path: Path) -> bool:
    """Side-by-side bars of the held-out metrics: rates on the left, margins (nats) on the right."""
    if not models:
        return False
    from mrpo.evaluation import LABEL_AWARE_METRIC, LABEL_AWARE_NOTE, METRICS

    rates = [key for key, metric in METRICS.items() if metric.kind == "rate"]
    margins = [key for key, metric in METRICS.items() if metric.kind == "margin"]
    figure, axes = _figure(2)
    figure.set_size_inches(max(11.0, 1.1 * len(models) * 4), 4.8)
    figure.suptitle("Held-out metrics")
    any_label_aware = any(model.result.get("label_aware") for model in models)
    width = 0.8 / len(models)
    for ax, keys, ylabel in ((axes[0], rates, "rate"), (axes[1], margins, "nats")):
        for index, model in enumerate(models):
            values = [_number_or_nan(model.result["metrics"].get(key)) for key in keys]
            positions = [i + (index - (len(models) - 1) / 2) * width for i in range(len(keys))]
            bars = ax.bar(positions, values, width, color=f"C{index % 10}", label=model.name)
            if model.result.get("label_aware") and LABEL_AWARE_METRIC in keys:
                bars[keys.index(LABEL_AWARE_METRIC)].set_hatch("//")
        ticks = [
            METRICS[key].label + ("*" if key == LABEL_AWARE_METRIC and any_label_aware else "")
            for key in keys
        ]
        ax.set_xticks(range(len(keys)), [_wrap(tick) for tick in ticks], fontsize="small")
        ax.set_ylabel(ylabel)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize="small")
    axes[0].set_ylim(0, 1.05)
    if any_label_aware:
        figure.text(0.01, 0.005, "* hatched: " + LABEL_AWARE_NOTE, fontsize="small")
    figure.savefig(path, dpi=100)
    return True


def _wrap(text: str, width: int = 16) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join([*lines, line])


def _number_or_nan(value: Any) -> float:
    return float(value) if is_number(value) else math.nan
