"""Small statistics shared by the experiments: means with Student-t intervals, paired differences, loss curves."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, int]:
    """Mean, half-width of the Student-t confidence interval (nan below two values), and the count."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    n = len(values)
    if n == 0:
        return math.nan, math.nan, 0
    mean = statistics.fmean(values)
    if n < 2:
        return mean, math.nan, 1
    from scipy.stats import t

    half_width = float(t.ppf((1 + confidence) / 2, n - 1)) * statistics.stdev(values) / math.sqrt(n)
    return mean, half_width, n


def paired(values: Mapping[int, float], baseline: Mapping[int, float]) -> dict[int, float]:
    """value - baseline for every seed that has both, in seed order."""
    return {seed: values[seed] - baseline[seed] for seed in sorted(values) if seed in baseline}


def interval_text(mean: float, half: float, *, scale: float = 100.0, signed: bool = True) -> str:
    """``+1.2 ± 0.8`` (points when scale is 100), ``–`` when there is nothing."""
    if not math.isfinite(mean):
        return "–"
    value = scale * mean + 0.0  # no "-0.0"
    value = 0.0 if abs(value) < 0.05 else value
    text = f"{value:+.1f}" if signed else f"{value:.1f}"
    return text + (f" ± {scale * half:.1f}" if math.isfinite(half) else "")


def loss_statistics(metrics_file: Path) -> dict[str, Any]:
    """Max and final training loss and the steps whose loss was not finite, from a run's metrics.jsonl."""
    losses: list[tuple[int, float]] = []
    if metrics_file.exists():
        for line in metrics_file.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if "loss" in record:
                losses.append((record["step"], float(record["loss"])))
    finite = [loss for _, loss in losses if math.isfinite(loss)]
    return {
        "logged_steps": len(losses),
        "max_loss": max(finite) if finite else math.nan,
        "final_loss": losses[-1][1] if losses else math.nan,
        "nonfinite_steps": [step for step, loss in losses if not math.isfinite(loss)],
        "loss_curve": losses,
    }
