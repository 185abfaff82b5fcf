"""Live diagnostics (diagnostics.TrainingWatcher): each condition fires once on a crafted metric stream that has it,
and nothing fires on a healthy one."""

from __future__ import annotations

import math

import pytest
import torch

from mrpo.audit_forecast import clip_severity
from mrpo.config.schema import DiagnosticsConfig, LossConfig
from mrpo.diagnostics import TrainingWatcher

SETTINGS = DiagnosticsConfig(window=3)


def healthy(step: int) -> dict[str, float]:
    """A run that learns: loss falls from log 2, margins grow, the references stay in the band, alpha is shared."""
    return {
        "loss": 0.693 - 0.01 * step,
        "grad_norm": 1.0,
        "rewards/margins": 0.02 * step,
        "ctro/clip_rate": 0.1,  # below the audit's partial band (25%): the external references enter the loss
        "alpha/ref1": 0.55,
        "alpha/ref2": 0.45,
    }


def stream(watcher: TrainingWatcher, rows) -> list:
    fired = []
    for step, row in enumerate(rows, start=1):
        fired += watcher.observe(step, row)
    return fired


def test_a_healthy_run_stays_silent():
    watcher = TrainingWatcher(SETTINGS, ["init", "external"])
    assert stream(watcher, [healthy(step) for step in range(1, 40)]) == []
    # A DPO run (one reference: alpha is 1 by construction, nothing is clipped) is healthy too.
    dpo = TrainingWatcher(SETTINGS, ["init"])
    rows = [
        {"loss": 0.69 - 0.01 * s, "rewards/margins": 0.03 * s, "alpha/ref1": 1.0, "ctro/clip_rate": 0.0}
        for s in range(1, 30)
    ]
    assert stream(dpo, rows) == []


def test_clip_saturation_fires_once_with_step_figure_and_remedy():
    watcher = TrainingWatcher(SETTINGS, ["init", "gemma"])
    rows = [healthy(s) for s in range(1, 4)] + [{**healthy(s), "ctro/clip_rate": 0.99} for s in range(4, 20)]
    fired = stream(watcher, rows)
    # The window's mean passes through the partial band (0.40 at step 4, 0.69 at step 5) on its way: that fires
    # once, then saturation fires once.
    assert [d.condition for d in fired] == ["clip_partial", "clip_saturation"]
    assert fired[0].step == 4 and "enters the loss only partly" in fired[0].message
    warning = fired[1]
    assert warning.step == 6  # the first full window of saturated logs: steps 4, 5, 6
    assert warning.value == pytest.approx(0.99)
    assert "clipped on 99%" in warning.message and "trains as DPO" in warning.message
    assert "clipped away ≈ DPO" in warning.message  # the audit's severity words
    assert "loss.align=pair" in warning.remedy and "mrpo inspect" in warning.remedy


def test_a_short_burst_below_the_window_is_not_saturation():
    watcher = TrainingWatcher(SETTINGS, ["init", "gemma"])
    rows = [healthy(s) for s in range(1, 10)]
    rows[4] = {**rows[4], "ctro/clip_rate": 1.0}
    rows[5] = {
        **rows[5],
        "ctro/clip_rate": 1.0,
    }  # two saturated logs, then back: the window mean (at most 0.7) stays below 0.9, in the partial band
    fired = stream(watcher, rows)
    assert [d.condition for d in fired] == ["clip_partial"]
    assert fired[0].step == 5 and fired[0].value == pytest.approx(0.4)  # the first window holding a burst


def test_a_partial_clip_rate_has_the_same_severity_words_in_inspect_and_in_the_live_warning():
    from test_audit import _audit, _partly_clipped_columns

    audit = _audit(*_partly_clipped_columns(), loss=LossConfig(clip="fixed", eps=0.1))
    rate = audit.references[1].clip_rate
    assert rate == pytest.approx(0.67)
    words = clip_severity(rate)
    assert words == "enters the loss only partly" and words in " ".join(audit.verdict)
    watcher = TrainingWatcher(SETTINGS, ["init", "gemma"])
    fired = stream(watcher, [{**healthy(s), "ctro/clip_rate": rate} for s in range(1, 10)])
    assert [d.condition for d in fired] == ["clip_partial"] and fired[0].step == 3
    assert words in fired[0].message and "clipped on 67%" in fired[0].message
    assert "trains as DPO" not in fired[0].message
    # Rising into the clipped-away band later fires that one too; falling back fires nothing more.
    more = stream(watcher, [{**healthy(s), "ctro/clip_rate": 0.95} for s in range(1, 4)])
    assert [d.condition for d in more] == ["clip_saturation"] and "clipped away ≈ DPO" in more[0].message
    assert stream(watcher, [{**healthy(s), "ctro/clip_rate": 0.5} for s in range(1, 4)]) == []


def test_the_configured_clip_saturation_moves_the_band_for_the_live_warning():
    strict = TrainingWatcher(DiagnosticsConfig(window=3, clip_saturation=0.6), ["init", "gemma"])
    fired = stream(strict, [{**healthy(s), "ctro/clip_rate": 0.67} for s in range(1, 6)])
    assert [d.condition for d in fired] == ["clip_saturation"]
    assert clip_severity(0.67, saturated=0.6) in fired[0].message


def test_alpha_collapse_names_the_reference():
    watcher = TrainingWatcher(SETTINGS, ["init", "big"])
    rows = [{**healthy(s), "alpha/ref1": 0.02, "alpha/ref2": 0.98} for s in range(1, 8)]
    fired = stream(watcher, rows)
    assert [d.condition for d in fired] == ["alpha_collapse/ref2"]
    assert "reference 2 ('big')" in fired[0].message and fired[0].step == 3


def test_loss_divergence_fires_when_the_loss_rises_above_its_start():
    watcher = TrainingWatcher(SETTINGS, ["init", "external"])
    rows = [{**healthy(s), "loss": 0.69} for s in range(1, 4)] + [
        {**healthy(s), "loss": 0.69 + 0.2 * s} for s in range(4, 12)
    ]
    fired = stream(watcher, rows)
    assert "loss_divergence" in [d.condition for d in fired]
    divergence = next(d for d in fired if d.condition == "loss_divergence")
    assert divergence.value > 0.69 + 0.069  # above the first window's mean by more than 10%
    assert "learning_rate" in divergence.remedy


def test_margin_collapse_after_a_positive_peak():
    watcher = TrainingWatcher(SETTINGS, ["init"])
    margins = [0.1, 0.2, 0.3, 0.3, 0.2, 0.0, -0.2, -0.4, -0.5, -0.6]
    rows = [{"loss": 0.6, "rewards/margins": m} for m in margins]
    fired = stream(watcher, rows)
    assert [d.condition for d in fired] == ["margin_collapse"]
    assert fired[0].value < 0


def test_margins_that_never_rose_do_not_count_as_a_collapse():
    watcher = TrainingWatcher(SETTINGS, ["init"])
    rows = [{"loss": 0.69, "rewards/margins": -0.01 * s} for s in range(12)]
    assert stream(watcher, rows) == []


def test_non_finite_logged_value_fires_once():
    watcher = TrainingWatcher(SETTINGS, ["init"])
    rows = [{**healthy(1), "grad_norm": math.nan}, {**healthy(2), "grad_norm": math.inf}]
    fired = stream(watcher, rows)
    assert [d.condition for d in fired] == ["non_finite"]
    assert "grad_norm" in fired[0].message


def test_near_identical_reference_from_the_cached_columns():
    chosen = torch.tensor(
        [[-10.0, -12.0, -9.0, -20.0], [-10.001, -12.0, -9.002, -20.0], [-15.0, -11.0, -30.0, -8.0]]
    )
    rejected = torch.tensor(
        [[-11.0, -15.0, -9.5, -21.0], [-11.0, -15.001, -9.5, -21.0], [-14.0, -19.0, -20.0, -9.0]]
    )
    watcher = TrainingWatcher(SETTINGS, ["init", "copy", "other"])
    fired = watcher.check_references(chosen, rejected)
    assert [d.condition for d in fired] == ["near_identical_reference/ref2"]
    assert "reference 2 ('copy')" in fired[0].message
    # A different reference is silent.
    assert (
        TrainingWatcher(SETTINGS, ["init", "other"]).check_references(chosen[[0, 2]], rejected[[0, 2]]) == []
    )
