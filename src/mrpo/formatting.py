"""How a number is written in tables and one-line summaries: the one rule of ``mrpo report``, ``mrpo evaluate``
and the model card. A rate (a share in [0, 1]) as a percentage, ``75.0%``; a margin signed, ``+0.805``; anything
else in four significant digits, ``0.0123``; ``—`` where there is no number (None, a bool, NaN, an infinity).
Imports nothing of ``mrpo``."""

from __future__ import annotations

import math
from typing import Any


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def percent(value: Any) -> str:
    return f"{float(value):.1%}" if is_number(value) else "—"


def signed(value: Any) -> str:
    return f"{float(value):+.3f}" if is_number(value) else "—"


def plain(value: Any) -> str:
    return f"{float(value):.4g}" if is_number(value) else "—"
