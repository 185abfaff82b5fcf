"""What an external reference can change over the start, measured from the cached margins (docs/method.md,
"What a reference can change").

At step 0 the policy is the start (reference 1), so a pair's gradient weight is ``sigmoid(-beta (d_1 - d_v))`` and
``d_v - d_1 ~ sum_k alpha_k (d_k - d_1)``: reference ``k`` moves a pair only by how far its margin ``d_k`` differs
from the start's own ``d_1``. ARWC weighs it by ``|d_k|``, blind to whether it agrees with the label. So what
matters is where ``d_k`` is on the label's side *and* beyond ``d_1`` (it knows more than the start), where it is
smaller than ``d_1`` (it can only shrink or sharpen the start's own margins), whether it agrees with the labels more
often than the start (a paired difference), and whether its margins only follow the answers' length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mrpo.audit_stats import PairedDifference, Rate, correlation, paired_difference

LENGTH_PRIOR_CORRELATION = 0.9
"""A reference whose margins correlate this much (either sign) with the answers' length difference is a length
prior (measured on HH-RLHF: 0.97 for both SmolLM2 and Gemma)."""

MOSTLY_LESS_CONFIDENT = 0.5
"""Share of pairs with |d_k| < |d_1| from which the verdict calls a reference less confident than the start."""


@dataclass(frozen=True)
class LengthTracking:
    """How far one reference's margins follow the answers' length (characters of the completion texts, the same for
    every reference whatever its tokenizer)."""

    correlation: float
    """Pearson correlation of ``d_k`` with ``len(rejected) - len(chosen)``: +1 when the shorter answer's margin
    grows with the length difference (the shape of a sequence log-prob that is mostly a per-character cost)."""
    shorter_wins: Rate
    """Share of the pairs whose answers differ in length where ``sign(d_k) == sign(len(rejected) - len(chosen))``:
    the reference prefers the shorter answer."""
    length_prior: bool
    """``|correlation| >= LENGTH_PRIOR_CORRELATION``."""


def length_tracking(margin: torch.Tensor, length_difference: torch.Tensor) -> LengthTracking:
    """Args: margin ``(N,)`` ``d_k``; length_difference ``(N,)`` ``len(rejected) - len(chosen)`` in characters."""
    length_difference = length_difference.double()
    differ = length_difference != 0
    same_sign = torch.sign(margin.double()[differ]) == torch.sign(length_difference[differ])
    value = correlation(margin, length_difference)
    return LengthTracking(value, Rate.of(same_sign), abs(value) >= LENGTH_PRIOR_CORRELATION)


@dataclass(frozen=True)
class StartComparison:
    """One external reference's margins against the start's on the same pairs."""

    knows_more: Rate
    """Share of pairs with ``d_k > 0`` and ``d_k > d_1``: on the label's side and more confident than the start,
    the only pairs where it can add what the start does not know."""
    less_confident: Rate
    """Share with ``|d_k| < |d_1|``: there ``d_k - d_1`` only pulls the virtual margin back from the start's own,
    so the pair is reweighted by what the start already knows."""
    agreement_difference: PairedDifference
    """``share(d_k > 0) - share(d_1 > 0)``, paired (the same pairs), with Newcombe's 95% interval."""


def compare_with_start(margin: torch.Tensor, start_margin: torch.Tensor) -> StartComparison:
    """Args: margin ``(N,)`` the external reference's ``d_k``; start_margin ``(N,)`` the start's ``d_1``."""
    margin, start_margin = margin.double(), start_margin.double()
    return StartComparison(
        knows_more=Rate.of((margin > 0) & (margin > start_margin)),
        less_confident=Rate.of(margin.abs() < start_margin.abs()),
        agreement_difference=paired_difference(margin > 0, start_margin > 0),
    )


def lever_sentence(label: str, comparison: StartComparison) -> str:
    """What the reference can change over the start, in the terms of the comparison."""
    knows, points = comparison.knows_more.value, comparison.agreement_difference
    evidence = f"label agreement {points.text()} against the start's"
    if comparison.less_confident.value >= MOSTLY_LESS_CONFIDENT:
        return (
            f"{label} is less confident than the initialising model on {comparison.less_confident.value:.0%} of "
            f"pairs: it can only reweight pairs by the start's own margins (on the label's side and more "
            f"confident than the start on {knows:.0%}; {evidence})."
        )
    lead = f"{label} is on the label's side and more confident than the start on {knows:.0%} of pairs"
    if points.low > 0:
        return f"{lead}: it can add what the start does not know ({evidence})."
    if points.high < 0:
        return (
            f"{lead}, but it agrees with the labels less often than the start ({evidence}): where it moves a pair "
            "it mostly moves it away from the labels."
        )
    return (
        f"{lead}, but its {evidence} is not distinguishable from zero: no evidence that it knows more than the "
        "start on this data."
    )


def length_sentence(label: str, length: LengthTracking, start: LengthTracking | None) -> str | None:
    """The length-prior warning for a reference whose margins follow the answers' length; None otherwise."""
    if not length.length_prior:
        return None
    winner = "shorter" if length.correlation > 0 else "longer"
    share = length.shorter_wins.value if length.correlation > 0 else 1 - length.shorter_wins.value
    start_text = (
        f"; the start's: correlation {start.correlation:.2f}, the shorter answer wins on {start.shorter_wins.value:.0%}"
        if start is not None
        else ""
    )
    return (
        f"{label}'s margins follow the answers' length (correlation {length.correlation:.2f}; the {winner} answer "
        f"wins on {share:.0%} of pairs{start_text}): a length prior, not knowledge."
    )
