"""Live diagnostics: warnings, while training runs, that the run is degenerate (clip saturation, alpha collapse,
divergence, margin collapse, non-finite logs, a near-identical reference).

``TrainingWatcher`` judges the stream of train log lines (and, before the first step, the cached reference columns)
and fires each condition at most once; ``DiagnosticsCallback`` feeds it from the Trainer's logs and writes what it
fires to the log and to ``OUTPUT/diagnostics.jsonl``. The thresholds shared with ``mrpo inspect`` -- the clip
severity scale and the near-identical rule -- live in the audit (``audit_forecast.clip_band``,
``audit.near_identical``), which this module reads and never the other way round.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from transformers import TrainerCallback

from mrpo.audit import near_identical, pairwise_agreement
from mrpo.audit_forecast import clip_band, clip_severity
from mrpo.config.schema import DiagnosticsConfig

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DIVERGENCE_TOLERANCE = 0.05
"""Loss divergence: the window's mean loss exceeds the first window's by more than max(this, 10% of it)."""

MARGIN_PEAK = 0.1
"""Margin collapse: the window's mean reward margin has fallen below 0 after a window mean above this."""


@dataclass(frozen=True)
class Diagnostic:
    """One warning: which condition, at which step, the figure that tripped it and what to do."""

    condition: str
    step: int
    value: float
    message: str
    remedy: str

    def line(self) -> str:
        return f"step {self.step}: {self.message} {self.remedy}"


class TrainingWatcher:
    """Judges the stream of train log lines; each condition fires at most once (per reference for alpha).

    Conditions, each over a window of ``settings.window`` consecutive train log lines:

    - ``clip_partial`` / ``clip_saturation``: mean ``ctro/clip_rate`` in the audit's partial band (from 25%) or at
      ``settings.clip_saturation`` and above -- the external references enter the loss only partly, or are clipped
      into the trust region so MRPO trains as DPO (the words of ``audit_forecast.clip_severity``, the same as inspect's);
    - ``alpha_collapse``: one reference's mean ``alpha/ref{k}`` above ``settings.alpha_collapse``;
    - ``loss_divergence``: mean loss above the first window's mean by more than max(0.05, 10%);
    - ``margin_collapse``: mean ``rewards/margins`` below 0 after a window mean above 0.1;
    - ``non_finite``: a logged value (e.g. grad_norm) is NaN or infinite (a non-finite loss already stops training);
    - ``near_identical_reference`` (from the cached columns, before the first step): an external reference
      near-identical to the initialising one by inspect's rule (``audit.near_identical``: within 0.05 nats, the same
      preference on 99% of pairs).
    """

    def __init__(self, settings: DiagnosticsConfig, reference_names: list[str] | None = None):
        self.settings = settings
        self.reference_names = reference_names or []
        self.history: list[dict[str, float]] = []
        self.fired: set[str] = set()
        self.first_window_loss: float | None = None
        self.margin_peak = -math.inf

    def check_references(
        self, reference_chosen: torch.Tensor, reference_rejected: torch.Tensor
    ) -> list[Diagnostic]:
        names = self.reference_names or [f"ref{k + 1}" for k in range(reference_chosen.shape[0])]
        found = []
        for row in pairwise_agreement(names, reference_chosen, reference_rejected)[: len(names) - 1]:
            first, other = row["references"]
            if near_identical(row):
                k = names.index(other) + 1
                found += self._fire(
                    f"near_identical_reference/ref{k}",
                    0,
                    row["mean_abs_level_difference"],
                    f"reference {k} ({other!r}) is near-identical to the initialising reference ({first!r}): mean "
                    f"level difference {row['mean_abs_level_difference']:.3f} nats, same preference on "
                    f"{row['agreement']:.0%} of pairs, so it cannot change the loss.",
                    "Use a reference that differs from the policy's start (another model, size or family).",
                )
        return found

    def observe(self, step: int, logs: dict[str, float]) -> list[Diagnostic]:
        """Feed one train log line; returns the warnings it fires."""
        found = self._non_finite(step, logs)
        if "loss" not in logs:
            return found
        self.history.append({k: float(v) for k, v in logs.items() if isinstance(v, int | float)})
        if len(self.history) < self.settings.window:
            return found
        for check in (
            self._clip_saturation,
            self._alpha_collapse,
            self._loss_divergence,
            self._margin_collapse,
        ):
            found += check(step)
        return found

    def _window_mean(self, key: str) -> float | None:
        """The mean of ``key`` over the last window of train logs, when every one of them logged it."""
        recent = self.history[-self.settings.window :]
        values = [row[key] for row in recent if key in row and math.isfinite(row[key])]
        return sum(values) / len(values) if len(values) == len(recent) else None

    def _non_finite(self, step: int, logs: dict[str, float]) -> list[Diagnostic]:
        found = []
        for key, value in logs.items():
            if isinstance(value, float) and not math.isfinite(value):
                found += self._fire(
                    "non_finite", step, value, f"the logged {key} is {value}.",
                    "Lower training.learning_rate or keep training.max_grad_norm above 0; train in float32 or "
                    "bfloat16 rather than float16.",
                )  # fmt: skip
        return found

    def _clip_saturation(self, step: int) -> list[Diagnostic]:
        """The window's clip rate on the audit's one scale (``audit.CLIP_SEVERITY``): a warning when it enters the
        partial band (``clip_partial``) and one when it enters the clipped-away band (``clip_saturation``, from
        ``settings.clip_saturation``), never the milder one after the stronger."""
        clip = self._window_mean("ctro/clip_rate")
        if clip is None or len(self.reference_names) == 1:
            return []
        band = clip_band(clip, self.settings.clip_saturation)
        if band == 0 or "clip_saturation" in self.fired:
            return []
        figure = (
            f"the external references were clipped on {clip:.0%} of their log-probs over the last "
            f"{self.settings.window} logs: {clip_severity(clip, self.settings.clip_saturation)} — "
        )
        remedy = (
            "Run `mrpo inspect` for the clip rate at other settings; widen loss.eps, set loss.align=pair, or "
            "loss.clip=off."
        )
        if band == 1:
            return self._fire(
                "clip_partial", step, clip,
                figure + "on those log-probs the trust region puts a scaled copy of the initialising reference in "
                "their place, so only part of what they know reaches the loss.",
                remedy,
            )  # fmt: skip
        return self._fire(
            "clip_saturation", step, clip,
            figure + "the trust region holds them at the initialising reference, so this run trains as DPO.",
            remedy,
        )  # fmt: skip

    def _alpha_collapse(self, step: int) -> list[Diagnostic]:
        if len(self.reference_names) == 1:  # with one reference alpha is 1 by construction
            return []
        found = []
        for key in sorted(k for k in self.history[-1] if k.startswith("alpha/ref")):
            alpha = self._window_mean(key)
            if alpha is None or alpha <= self.settings.alpha_collapse:
                continue
            k = int(key.rsplit("ref", 1)[1])
            name = self.reference_names[k - 1] if k <= len(self.reference_names) else key
            found += self._fire(
                f"alpha_collapse/ref{k}", step, alpha,
                f"reference {k} ({name!r}) holds a mean weight alpha of {alpha:.2f} over the last "
                f"{self.settings.window} logs: the virtual reference is that one reference.",
                "Fixed loss.weights spread the weight; a reference whose margins dwarf the others' may be "
                "miscalibrated (see `mrpo inspect`).",
            )  # fmt: skip
        return found

    def _loss_divergence(self, step: int) -> list[Diagnostic]:
        loss = self._window_mean("loss")
        if self.first_window_loss is None:
            self.first_window_loss = loss
            return []
        tolerance = max(DIVERGENCE_TOLERANCE, 0.1 * abs(self.first_window_loss))
        if loss is None or loss <= self.first_window_loss + tolerance:
            return []
        window = self.settings.window
        return self._fire(
            "loss_divergence", step, loss,
            f"the mean loss over the last {window} logs ({loss:.3f}) is above the first {window} logs' "
            f"({self.first_window_loss:.3f}): training is diverging.",
            "Lower training.learning_rate; with external references, keep the trust region on (loss.clip).",
        )  # fmt: skip

    def _margin_collapse(self, step: int) -> list[Diagnostic]:
        margin = self._window_mean("rewards/margins")
        if margin is None:
            return []
        found = []
        if margin < 0 and self.margin_peak > MARGIN_PEAK:
            found = self._fire(
                "margin_collapse", step, margin,
                f"the mean reward margin fell to {margin:+.3f} over the last {self.settings.window} logs after "
                f"reaching {self.margin_peak:+.3f}: the policy now prefers the rejected answers against its "
                "reference.",
                "Lower training.learning_rate or loss.beta, or check the labels (`mrpo inspect` lists suspect "
                "pairs).",
            )  # fmt: skip
        self.margin_peak = max(self.margin_peak, margin)
        return found

    def _fire(self, condition: str, step: int, value: float, message: str, remedy: str) -> list[Diagnostic]:
        if condition in self.fired:
            return []
        self.fired.add(condition)
        return [Diagnostic(condition, step, float(value), message, remedy)]


class DiagnosticsCallback(TrainerCallback):
    """Warns once per condition (see ``TrainingWatcher``) in the log and in ``OUTPUT/diagnostics.jsonl``."""

    def __init__(
        self,
        path: str | Path,
        settings: DiagnosticsConfig,
        reference_names: list[str],
        reference_columns: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        self.path = Path(path)
        self.watcher = TrainingWatcher(settings, reference_names)
        self.reference_columns = reference_columns

    def on_train_begin(self, args, state, control, **kwargs):
        if self.reference_columns is not None and state.is_world_process_zero:
            self._emit(self.watcher.check_references(*self.reference_columns), state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self._emit(self.watcher.observe(state.global_step, logs), state.global_step)

    def _emit(self, diagnostics: list[Diagnostic], step: int) -> None:
        for diagnostic in diagnostics:
            logger.warning("%s", diagnostic.line())
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(dataclasses.asdict(diagnostic)) + "\n")
