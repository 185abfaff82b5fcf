"""Suspect pairs: pairs whose label the references confidently contradict, candidates for label noise (``mrpo
inspect`` lists them in ``suspect_pairs.jsonl``). Read from the cached reference margins only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

SUSPECT_THRESHOLD = 1.0
"""A pair is flagged when every reference of a group contradicts its label by at least this many of its own median
absolute margins (see :func:`suspect_scores`)."""


def suspect_scores(margins: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    """How confidently *every* reference in ``rows`` contradicts each pair's label: shape ``(B,)``.

    Each reference's contradiction is its margin against the label in units of its own typical margin,
    ``c_k = -d_k / median_b |d_k|``, so references of different families and answer lengths compare; a group's
    score is the smallest ``c_k`` of its members (all of them must contradict at least that much). A score of 1
    means every reference in the group prefers the rejected answer by at least its median margin.

    Args:
        margins: ``(K, B)`` reference margins ``d_k = l_k(y_w) - l_k(y_l)``.
        rows: which references form the group (e.g. the external ones, or all).
    """
    group = margins[list(rows)].double()
    scale = group.abs().median(dim=1, keepdim=True).values.clamp(min=1e-6)
    return (-group / scale).min(dim=0).values


@dataclass
class SuspectPair:
    """One pair the references contradict, with what they said."""

    pair_id: str
    score_external: float | None
    """Smallest normalised contradiction among the external references (None when K = 1)."""
    score_all: float
    """Smallest normalised contradiction among all references."""
    flagged_by: list[str]
    margins: dict[str, float]
    """Reference name -> d_k in nats (negative: it prefers the rejected answer)."""


def find_suspects(
    margins: torch.Tensor, names: Sequence[str], pair_ids: Sequence[str], threshold: float = SUSPECT_THRESHOLD
) -> list[SuspectPair]:
    """Pairs flagged by the external references, or by all references, ranked most suspect first."""
    groups: dict[str, torch.Tensor] = {"all": suspect_scores(margins, range(len(names)))}
    if len(names) > 1:
        groups["external"] = suspect_scores(margins, range(1, len(names)))
    flagged = torch.zeros(len(pair_ids), dtype=torch.bool)
    for scores in groups.values():
        flagged |= scores >= threshold
    suspects = []
    for index in flagged.nonzero().flatten().tolist():
        external = groups.get("external")
        suspects.append(
            SuspectPair(
                pair_id=pair_ids[index],
                score_external=float(external[index]) if external is not None else None,
                score_all=float(groups["all"][index]),
                flagged_by=[name for name, scores in groups.items() if scores[index] >= threshold],
                margins={name: float(margins[k, index]) for k, name in enumerate(names)},
            )
        )
    # Ranked by the external references' verdict when there are some (the initialising one is the policy itself).
    suspects.sort(key=lambda s: -(s.score_external if s.score_external is not None else s.score_all))
    return suspects
