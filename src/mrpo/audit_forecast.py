"""The trust region forecast of ``mrpo inspect``: the clip rate the loss will see on the cached columns, computed
by ``losses.mrpo_loss`` itself (so it is the first epoch's logged ``ctro/clip_rate``, exactly), at the configured
settings and at the alternatives a user can switch to; and the one scale of clip-rate severity (``CLIP_SEVERITY``)
that inspect's verdict, the live warning and the report all speak.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from mrpo.config.schema import LossConfig
from mrpo.losses import MRPOOutput, mrpo_loss

EPS_SWEEP = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
"""The eps values at which the clip rate is also forecast (with the configured clip mode)."""

SATURATED_CLIP_RATE = 0.9
"""From this clip rate on an external reference barely moves the virtual reference: the run trains like DPO (the
default of ``diagnostics.clip_saturation``, which moves this boundary for inspect and the live warning alike)."""

PARTIAL_CLIP_RATE = 0.25
"""From this clip rate on, a quarter of an external reference's log-probs or more are replaced by a scaled copy of
the initialising reference's: it enters the loss only partly."""

CLIP_SEVERITY = (
    (0.0, "enters the loss"),
    (PARTIAL_CLIP_RATE, "enters the loss only partly"),
    (SATURATED_CLIP_RATE, "clipped away ≈ DPO"),
)
"""The one scale of clip-rate severity (lower bound, words), used by ``mrpo inspect``'s verdict, the live warning
(``diagnostics.TrainingWatcher``) and the report: below 25% an external reference enters the loss, from 25% it enters
only partly, from 90% it is clipped away and the run trains almost as DPO."""


def clip_band(rate: float, saturated: float = SATURATED_CLIP_RATE) -> int:
    """The index in ``CLIP_SEVERITY`` of a clip rate: 0 enters, 1 partly, 2 clipped away. ``saturated`` moves the
    top boundary (``diagnostics.clip_saturation``); the partial one never lies above it."""
    if rate >= saturated:
        return 2
    return 1 if rate >= min(PARTIAL_CLIP_RATE, saturated) else 0


def clip_severity(rate: float, saturated: float = SATURATED_CLIP_RATE) -> str:
    """The words of ``CLIP_SEVERITY`` for a clip rate (a share in [0, 1]), e.g. 0.67 -> "enters the loss only
    partly": the one scale for every place that judges a clip rate."""
    return CLIP_SEVERITY[clip_band(rate, saturated)][1]


# ----------------------------------------------------------------------------------------------------------------
# What the loss will do: the same code path as training
# ----------------------------------------------------------------------------------------------------------------


def loss_view(
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    loss: LossConfig,
    policy_tokens: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> MRPOOutput:
    """``mrpo_loss`` on the cached columns with a zero policy: alpha, eps and clip masks exactly as training sees
    them (the reference-side quantities do not depend on the policy). Float32, like the training dataset.
    ``policy_tokens``: the responses' ``(N,)`` chosen and rejected lengths in the policy's tokens, which
    ``loss.length_normalize`` divides by (required then)."""
    chosen, rejected = reference_chosen.float(), reference_rejected.float()
    zeros = chosen.new_zeros(chosen.shape[1])
    chosen_tokens, rejected_tokens = policy_tokens or (None, None)
    return mrpo_loss(
        zeros,
        zeros,
        chosen,
        rejected,
        **dataclasses.asdict(loss),
        chosen_tokens=chosen_tokens,
        rejected_tokens=rejected_tokens,
    )


def clip_rates(output: MRPOOutput) -> list[float]:
    """Per reference (index 0 = the initialising one, always 0): the share of its log-probs the clamp moved."""
    moved = (output.clipped_chosen.float() + output.clipped_rejected.float()) / 2  # (K, B)
    return [float(row.mean()) if row.numel() else math.nan for row in moved]


def band_half_width(
    output: MRPOOutput, reference_chosen: torch.Tensor, reference_rejected: torch.Tensor
) -> float:
    """Mean half-width of the trust region in nats: eps_y |l_1(y)| over both responses of every pair (after
    alignment the band is still centred on the initialising reference, whose values alignment never moves)."""
    widths = torch.cat(
        [output.eps_chosen * reference_chosen[0].abs(), output.eps_rejected * reference_rejected[0].abs()]
    )
    return float(widths.double().mean()) if widths.numel() else math.nan


def clip_forecast(
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    loss: LossConfig,
    policy_tokens: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, list[float]]:
    """Clip rate per reference under the configured loss and the alternatives a user can switch to.

    Keys: ``"configured"``, ``"align=pair"`` (configured eps), ``"clip=fixed"`` (configured eps), ``"clip=off"``
    and ``"eps=<value>"`` for each of ``EPS_SWEEP`` with the configured clip mode (adaptive when the configuration
    has clipping off) and alignment. ``policy_tokens`` as ``loss_view``'s.
    """

    def rates(**changes: Any) -> list[float]:
        return clip_rates(
            loss_view(
                reference_chosen, reference_rejected, dataclasses.replace(loss, **changes), policy_tokens
            )
        )

    sweep_clip = loss.clip if loss.clip != "off" else "adaptive"
    forecast = {
        "configured": rates(),
        "align=pair": rates(align="pair", clip=sweep_clip),
        "clip=fixed": rates(clip="fixed"),
        "clip=off": rates(clip="off"),
    }
    for eps in EPS_SWEEP:
        forecast[f"eps={eps:g}"] = rates(eps=eps, clip=sweep_clip)
    return forecast
