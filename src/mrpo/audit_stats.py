"""The small statistics of the reference audit: a share of pairs with its Wilson interval, the paired difference of
two shares with Newcombe's interval, and a correlation. Plain numbers in, plain numbers out (no model, no config).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

WILSON_Z = 1.959963984540054  # two-sided 95%


@dataclass(frozen=True)
class Rate:
    """A share of pairs with its 95% Wilson score interval."""

    value: float
    low: float
    high: float
    count: int
    total: int

    @classmethod
    def of(cls, hits: torch.Tensor) -> Rate:
        total = int(hits.numel())
        count = int(hits.sum())
        low, high = wilson_interval(count, total)
        return cls(count / total if total else math.nan, low, high, count, total)

    def text(self) -> str:
        return f"{self.value:.1%} [{self.low:.1%}, {self.high:.1%}]"


def wilson_interval(count: int, total: int, z: float = WILSON_Z) -> tuple[float, float]:
    """The Wilson score interval of a binomial share (good at small n and near 0 or 1, unlike the normal one)."""
    if total == 0:
        return math.nan, math.nan
    share = count / total
    denominator = 1 + z * z / total
    centre = (share + z * z / (2 * total)) / denominator
    half = z * math.sqrt(share * (1 - share) / total + z * z / (4 * total * total)) / denominator
    low = 0.0 if count == 0 else max(0.0, centre - half)  # exact ends, not 1e-17 of rounding
    high = 1.0 if count == total else min(1.0, centre + half)
    return low, high


@dataclass(frozen=True)
class PairedDifference:
    """``share(first) - share(second)`` on the same pairs, with its 95% interval (see :func:`paired_difference`)."""

    value: float
    low: float
    high: float
    pairs: int
    method: str = "Newcombe hybrid score, paired (method 10, no continuity correction)"

    def text(self) -> str:
        """In percentage points: ``+12.3 points [+6.1, +18.0]``."""
        return f"{100 * self.value:+.1f} points [{100 * self.low:+.1f}, {100 * self.high:+.1f}]"


def paired_difference(first: torch.Tensor, second: torch.Tensor, z: float = WILSON_Z) -> PairedDifference:
    """The difference of two shares measured on the same pairs, ``mean(first) - mean(second)``, with Newcombe's
    hybrid score interval for paired proportions (Newcombe 1998, Statistics in Medicine 17:2635, method 10).

    With the 2x2 counts ``a`` (both true), ``b`` (first only), ``c`` (second only), ``d`` (neither) of ``n``
    pairs, ``p1 = (a + b) / n``, ``p2 = (a + c) / n`` and their Wilson intervals ``[l1, u1]``, ``[l2, u2]``,
    the interval is ``[D - delta, D + epsilon]`` for ``D = p1 - p2`` with

        delta   = sqrt((p1 - l1)^2 - 2 phi (p1 - l1)(u2 - p2) + (u2 - p2)^2)
        epsilon = sqrt((u1 - p1)^2 - 2 phi (u1 - p1)(p2 - l2) + (p2 - l2)^2)

    where ``phi = (ad - bc) / sqrt((a + b)(c + d)(a + c)(b + d))`` is the correlation of the two indicators (0
    when a margin is empty). The pairing matters: two references that agree on most pairs have a much narrower
    interval than two independent shares would.

    Args:
        first, second: ``(N,)`` booleans, one per pair, aligned.
    """
    if first.shape != second.shape:
        raise ValueError(f"paired shares need aligned pairs: {tuple(first.shape)} vs {tuple(second.shape)}")
    first, second = first.bool(), second.bool()
    n = int(first.numel())
    if n == 0:
        return PairedDifference(math.nan, math.nan, math.nan, 0)
    a = int((first & second).sum())
    b = int((first & ~second).sum())
    c = int((~first & second).sum())
    d = n - a - b - c
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson_interval(a + b, n, z)
    l2, u2 = wilson_interval(a + c, n, z)
    product = (a + b) * (c + d) * (a + c) * (b + d)
    phi = (a * d - b * c) / math.sqrt(product) if product > 0 else 0.0
    delta = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    epsilon = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    difference = p1 - p2
    return PairedDifference(difference, max(-1.0, difference - delta), min(1.0, difference + epsilon), n)


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson's correlation of two aligned vectors; NaN below two values or when one of them is constant."""
    if a.numel() < 2:
        return math.nan
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denominator = float(a.norm() * b.norm())
    return float((a * b).sum()) / denominator if denominator > 0 else math.nan
