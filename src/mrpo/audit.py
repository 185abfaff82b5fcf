"""The reference audit behind ``mrpo inspect``: what each cached reference will do to the loss, before training.

Everything here is read from the K cached reference columns of a split (no model, no GPU):

- **label agreement** of each reference: the share of pairs whose chosen answer it finds more likely (per
  sequence and per token), with a 95% Wilson interval, and its mean margin ``d_k = l_k(y_w) - l_k(y_l)``;
- **the trust region forecast**: each external reference's level gap to the initialising one against the width of
  the CTRO band, and the clip rate the loss will see, computed by ``losses.mrpo_loss`` itself on the cached columns
  (so the forecast is the first epoch's logged ``ctro/clip_rate``, exactly), at the configured settings and at
  other ``eps`` / ``align="pair"`` / ``clip="off"``;
- **the weights alpha** each reference gets (mean, and how often one reference takes more than 0.9 of a pair);
- **agreement between references**, so near-duplicates and contrarians stand out;
- **suspect pairs**: pairs whose label the references confidently contradict (see :func:`suspect_scores`),
  candidates for label noise;
- **a verdict in plain words** with the knobs that change it.

The functions take tensors and return plain data (JSON-ready dicts and dataclasses); ``pipeline.run_inspect``
reads the data and the cache, and ``cli`` prints.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mrpo.config import LossConfig
from mrpo.losses import MRPOOutput, mrpo_loss

EPS_SWEEP = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
"""The eps values at which the clip rate is also forecast (with the configured clip mode)."""

SATURATED_CLIP_RATE = 0.9
"""Above this clip rate an external reference barely moves the virtual reference: the run trains like DPO."""

PARTIAL_CLIP_RATE = 0.5

ALPHA_DOMINANCE = 0.9
"""A reference "takes" a pair when its weight on it exceeds this."""

NEAR_IDENTICAL_GAP = 0.05
"""Mean |l_j(y) - l_k(y)| in nats below which two references are near-identical."""

SUSPECT_THRESHOLD = 1.0
"""A pair is flagged when every reference of a group contradicts its label by at least this many of its own median
absolute margins (see :func:`suspect_scores`)."""

WILSON_Z = 1.959963984540054  # two-sided 95%


# ----------------------------------------------------------------------------------------------------------------
# Small statistics
# ----------------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------------
# What the loss will do: the same code path as training
# ----------------------------------------------------------------------------------------------------------------


def loss_view(
    reference_chosen: torch.Tensor, reference_rejected: torch.Tensor, loss: LossConfig
) -> MRPOOutput:
    """``mrpo_loss`` on the cached columns with a zero policy: alpha, eps and clip masks exactly as training sees
    them (the reference-side quantities do not depend on the policy). Float32, like the training dataset."""
    chosen, rejected = reference_chosen.float(), reference_rejected.float()
    zeros = chosen.new_zeros(chosen.shape[1])
    return mrpo_loss(zeros, zeros, chosen, rejected, **dataclasses.asdict(loss))


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
    reference_chosen: torch.Tensor, reference_rejected: torch.Tensor, loss: LossConfig
) -> dict[str, list[float]]:
    """Clip rate per reference under the configured loss and the alternatives a user can switch to.

    Keys: ``"configured"``, ``"align=pair"`` (configured eps), ``"clip=fixed"`` (configured eps), ``"clip=off"``
    and ``"eps=<value>"`` for each of ``EPS_SWEEP`` with the configured clip mode (adaptive when the configuration
    has clipping off) and alignment.
    """

    def rates(**changes: Any) -> list[float]:
        return clip_rates(
            loss_view(reference_chosen, reference_rejected, dataclasses.replace(loss, **changes))
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


# ----------------------------------------------------------------------------------------------------------------
# Suspect pairs
# ----------------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------------
# The audit of one split
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ReferenceAudit:
    """What one reference will do on one split."""

    name: str
    index: int
    """1-based; 1 is the initialising reference."""
    label_agreement: Rate
    """Share of pairs with d_k > 0 (ties count as not agreeing)."""
    label_agreement_per_token: Rate
    """Share with l_k(y_w) / n_w > l_k(y_l) / n_l, token counts of this reference's own tokenization."""
    ties: int
    mean_margin: float
    mean_abs_margin: float
    alpha_mean: float
    alpha_dominant: float
    """Share of pairs where this reference's weight exceeds ALPHA_DOMINANCE."""
    level_gap: float | None = None
    """Mean l_k(y) - l_1(y) over both responses (nats); None for the initialising reference."""
    mean_abs_level_gap: float | None = None
    clip_rate: float | None = None
    """At the configured settings (None for the initialising reference)."""
    clip_alternatives: dict[str, float] = field(default_factory=dict)


@dataclass
class SplitAudit:
    """The audit of one split: per reference, between references, the forecast, and the suspect pairs."""

    split: str
    pairs: int
    loss: dict[str, Any]
    references: list[ReferenceAudit]
    band_half_width: float
    """Mean half-width of the CTRO band in nats at the configured settings."""
    clip_rate: float
    """Mean over pairs of the per-pair clip rate: what training logs as ``ctro/clip_rate``."""
    pairwise: list[dict[str, Any]]
    suspects: list[SuspectPair]
    suspect_threshold: float
    verdict: list[str]

    def to_json(self) -> dict[str, Any]:
        content = dataclasses.asdict(self)
        content["suspects"] = {
            "threshold": self.suspect_threshold,
            "count": len(self.suspects),
            "flagged_by_external": sum("external" in s.flagged_by for s in self.suspects),
            "flagged_by_all": sum("all" in s.flagged_by for s in self.suspects),
        }
        del content["suspect_threshold"]
        return content


def audit_split(
    split: str,
    names: Sequence[str],
    pair_ids: Sequence[str],
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    loss: LossConfig,
    *,
    suspect_threshold: float = SUSPECT_THRESHOLD,
) -> SplitAudit:
    """Audit the K cached references of one split.

    Args:
        names: the K reference names, the initialising one first.
        pair_ids: the N pairs, aligned with the columns.
        reference_chosen, reference_rejected: ``(K, N)`` cached sequence log-probs.
        chosen_tokens, rejected_tokens: ``(K, N)`` completion token counts, each reference's own.
        loss: the configured loss (its clip, eps, align and weights decide the forecast).
    """
    num_references = len(names)
    if reference_chosen.shape != (num_references, len(pair_ids)):
        raise ValueError(
            f"reference columns {tuple(reference_chosen.shape)} do not match {num_references} references x "
            f"{len(pair_ids)} pairs"
        )
    configured = loss_view(reference_chosen, reference_rejected, loss)
    forecast = clip_forecast(reference_chosen, reference_rejected, loss) if num_references > 1 else {}
    margins = reference_chosen.double() - reference_rejected.double()
    references = [
        _reference_audit(
            k, name, reference_chosen, reference_rejected, chosen_tokens, rejected_tokens, configured
        )
        for k, name in enumerate(names)
    ]
    for k, audit in enumerate(references[1:], start=1):
        audit.clip_rate = forecast["configured"][k]
        audit.clip_alternatives = {setting: rates[k] for setting, rates in forecast.items()}
    suspects = find_suspects(margins, names, pair_ids, suspect_threshold)
    result = SplitAudit(
        split=split,
        pairs=len(pair_ids),
        loss=dataclasses.asdict(loss),
        references=references,
        band_half_width=band_half_width(configured, reference_chosen.double(), reference_rejected.double()),
        clip_rate=float(configured.clip_rate.double().mean()) if len(pair_ids) else math.nan,
        pairwise=pairwise_agreement(names, reference_chosen, reference_rejected),
        suspects=suspects,
        suspect_threshold=suspect_threshold,
        verdict=[],
    )
    result.verdict = verdict(result)
    return result


def _reference_audit(
    k: int,
    name: str,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    configured: MRPOOutput,
) -> ReferenceAudit:
    """Reference ``k``'s agreement with the labels, margins, weights and level gap (its clip rates come from the
    forecast)."""
    chosen, rejected = reference_chosen[k].double(), reference_rejected[k].double()
    margin = chosen - rejected
    per_token = chosen / chosen_tokens[k].clamp(min=1) > rejected / rejected_tokens[k].clamp(min=1)
    audit = ReferenceAudit(
        name=name,
        index=k + 1,
        label_agreement=Rate.of(margin > 0),
        label_agreement_per_token=Rate.of(per_token),
        ties=int((margin == 0).sum()),
        mean_margin=float(margin.mean()),
        mean_abs_margin=float(margin.abs().mean()),
        alpha_mean=float(configured.alpha[k].double().mean()),
        alpha_dominant=float((configured.alpha[k] > ALPHA_DOMINANCE).double().mean()),
    )
    if k > 0:
        gaps = torch.cat([chosen - reference_chosen[0].double(), rejected - reference_rejected[0].double()])
        audit.level_gap = float(gaps.mean())
        audit.mean_abs_level_gap = float(gaps.abs().mean())
    return audit


def pairwise_agreement(
    names: Sequence[str], reference_chosen: torch.Tensor, reference_rejected: torch.Tensor
) -> list[dict[str, Any]]:
    """For every two references: how often they prefer the same answer, how their margins correlate, and how far
    apart their levels are (mean |l_j(y) - l_k(y)| over both responses)."""
    margins = reference_chosen.double() - reference_rejected.double()
    rows = []
    for j in range(len(names)):
        for k in range(j + 1, len(names)):
            same_side = torch.sign(margins[j]) == torch.sign(margins[k])
            level = torch.cat(
                [
                    (reference_chosen[j].double() - reference_chosen[k].double()).abs(),
                    (reference_rejected[j].double() - reference_rejected[k].double()).abs(),
                ]
            )
            rows.append(
                {
                    "references": [names[j], names[k]],
                    "agreement": float(same_side.double().mean()),
                    "margin_correlation": _correlation(margins[j], margins[k]),
                    "mean_abs_level_difference": float(level.mean()),
                }
            )
    return rows


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() < 2:
        return math.nan
    a, b = a - a.mean(), b - b.mean()
    denominator = float(a.norm() * b.norm())
    return float((a * b).sum()) / denominator if denominator > 0 else math.nan


# ----------------------------------------------------------------------------------------------------------------
# The verdict in plain words
# ----------------------------------------------------------------------------------------------------------------


def _setting(loss: dict[str, Any]) -> str:
    if loss["clip"] == "off":
        return "with clipping off"
    mode = "adaptive " if loss["clip"] == "adaptive" else "fixed "
    aligned = ", align=pair" if loss["align"] == "pair" else ""
    return f"at {mode}eps {loss['eps']:g}{aligned}"


def verdict(audit: SplitAudit) -> list[str]:
    """Short sentences: what each reference will do in this run, and which knobs change it."""
    lines = []
    initialising = audit.references[0]
    if len(audit.references) == 1:
        lines.append(
            f"One reference ({initialising.name!r}): this run is DPO. It prefers the chosen answer on "
            f"{initialising.label_agreement.text()} of the {audit.pairs} pairs."
        )
    for ref in audit.references[1:]:
        lines += _external_verdict(audit, ref)
    for ref in audit.references:
        if len(audit.references) > 1 and ref.alpha_dominant >= 0.5:
            lines.append(
                f"reference {ref.index} ({ref.name!r}) takes more than {ALPHA_DOMINANCE:.0%} of the weight on "
                f"{ref.alpha_dominant:.0%} of pairs: its margins dwarf the others', so the virtual reference is "
                "mostly this one (fixed loss.weights spread it)."
            )
    if audit.suspects:
        lines.append(_suspects_sentence(audit))
    saturated = [
        ref
        for ref in audit.references[1:]
        if audit.loss["clip"] != "off" and ref.clip_rate >= SATURATED_CLIP_RATE
    ]
    if saturated and len(saturated) == len(audit.references) - 1:
        lines.append(
            "Overall: every external reference is clipped away, so this MRPO run is DPO against the initialising "
            "reference. Widen the trust region (loss.eps, loss.align=pair) or turn it off (loss.clip=off) to let "
            "them in."
        )
    return lines


def _external_verdict(audit: SplitAudit, ref: ReferenceAudit) -> list[str]:
    """What one external reference will do: its clipping (or that it is a copy of the initialising one), and
    whether its preferences mean anything on this data."""
    loss, label = audit.loss, f"reference {ref.index} ({ref.name!r})"
    identical = _near_identical(audit, audit.references[0].name, ref.name)
    if identical:
        return [
            f"{label} is near-identical to the initialising reference (mean level difference "
            f"{identical['mean_abs_level_difference']:.3f} nats, same preference on {identical['agreement']:.0%} "
            "of pairs): it changes nothing whatever the settings; use another model."
        ]
    alternatives = ref.clip_alternatives
    knobs = (
        f"with loss.align=pair {alternatives['align=pair']:.0%}, loss.eps=1.0 {alternatives['eps=1']:.0%}, "
        f"loss.clip=off 0% (then its weight alpha averages {ref.alpha_mean:.2f})"
    )
    gap = (
        f"its log-probs sit {ref.mean_abs_level_gap:.1f} nats from the initialising reference's on average, the "
        f"trust region is ±{audit.band_half_width:.2f} nats wide"
    )
    if loss["clip"] == "off":
        lines = [
            f"{label} enters the loss unclipped (clip=off) with mean weight alpha {ref.alpha_mean:.2f}; "
            f"{gap.replace('the trust region is', 'a default trust region would be')}."
        ]
    elif ref.clip_rate >= SATURATED_CLIP_RATE:
        lines = [
            f"{label} will be clipped on {ref.clip_rate:.0%} of its log-probs {_setting(loss)}: {gap}. This run "
            f"would train almost exactly as DPO. Clipped share {knobs}."
        ]
    elif ref.clip_rate >= PARTIAL_CLIP_RATE:
        lines = [
            f"{label} will be clipped on {ref.clip_rate:.0%} of its log-probs {_setting(loss)}: it enters the loss "
            f"only partly ({gap}). Clipped share {knobs}."
        ]
    else:
        lines = [
            f"{label} enters the loss: clipped on {ref.clip_rate:.0%} of its log-probs {_setting(loss)}, mean weight "
            f"alpha {ref.alpha_mean:.2f}."
        ]
    agreement = ref.label_agreement
    if agreement.low <= 0.5 <= agreement.high:
        lines.append(
            f"{label} prefers the chosen answer on {agreement.text()} of pairs: not distinguishable from chance on "
            "this data, so whatever it adds is mostly noise."
        )
    elif agreement.high < 0.5:
        lines.append(
            f"{label} prefers the *rejected* answer on most pairs ({1 - agreement.value:.0%}): it contradicts your "
            "labels (or your labels are reversed)."
        )
    return lines


def _suspects_sentence(audit: SplitAudit) -> str:
    external = sum("external" in s.flagged_by for s in audit.suspects)
    everyone = sum("all" in s.flagged_by for s in audit.suspects)
    scope = (
        f"{external} by the external references, {everyone} by all references"
        if len(audit.references) > 1
        else f"{everyone} by the initialising reference"
    )
    return (
        f"{len(audit.suspects)} of {audit.pairs} pairs ({len(audit.suspects) / max(audit.pairs, 1):.0%}) have a "
        f"label the references confidently contradict ({scope}): candidates for label noise, listed in "
        "suspect_pairs.jsonl."
    )


def _near_identical(audit: SplitAudit, first: str, second: str) -> dict[str, Any] | None:
    for row in audit.pairwise:
        if row["references"] == [first, second]:
            if row["mean_abs_level_difference"] < NEAR_IDENTICAL_GAP and row["agreement"] >= 0.99:
                return row
    return None


# ----------------------------------------------------------------------------------------------------------------
# The terminal summary
# ----------------------------------------------------------------------------------------------------------------


def format_audit(audit: SplitAudit) -> str:
    """A fixed-width table per reference, the pairwise agreement, and the verdict."""
    header = (
        f"{'reference':<18}{'agrees w/ labels (95% CI)':>30}{'per token':>11}{'margin':>9}{'gap':>8}"
        f"{'clip':>7}{'alpha':>7}{'>0.9':>6}"
    )
    lines = [
        f"[{audit.split}] {audit.pairs} pairs; loss {_setting(audit.loss)}, weights {audit.loss['weights']}",
        header,
    ]
    for ref in audit.references:
        gap = f"{ref.level_gap:+.1f}" if ref.level_gap is not None else "–"
        clip = f"{ref.clip_rate:.0%}" if ref.clip_rate is not None else "–"
        lines.append(
            f"{f'{ref.index} {ref.name}':<18}{ref.label_agreement.text():>30}{ref.label_agreement_per_token.value:>11.1%}"
            f"{ref.mean_margin:>+9.2f}{gap:>8}{clip:>7}{ref.alpha_mean:>7.2f}{ref.alpha_dominant:>6.0%}"
        )
    if len(audit.references) > 1:
        lines.append(
            f"CTRO band: ±{audit.band_half_width:.2f} nats on average; forecast ctro/clip_rate {audit.clip_rate:.1%}"
        )
        settings = list(audit.references[1].clip_alternatives)
        lines.append("clip rate by setting: " + ", ".join(settings))
        for ref in audit.references[1:]:
            rates = " ".join(f"{ref.clip_alternatives[s]:.0%}" for s in settings)
            lines.append(f"  {ref.index} {ref.name}: {rates}")
        for row in audit.pairwise:
            lines.append(
                f"pair {row['references'][0]} / {row['references'][1]}: same preference on {row['agreement']:.0%}, "
                f"margin correlation {row['margin_correlation']:+.2f}, level difference "
                f"{row['mean_abs_level_difference']:.1f} nats"
            )
    lines.append("verdict:")
    lines.extend(f"  - {line}" for line in audit.verdict)
    return "\n".join(lines)
