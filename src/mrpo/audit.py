"""The reference audit behind ``mrpo inspect``: what each cached reference will do to the loss, before training.

Everything here is read from the K cached reference columns of a split (no model, no GPU):

- **label agreement** of each reference: the share of pairs whose chosen answer it finds more likely (per
  sequence and per token), with a 95% Wilson interval, and its mean margin ``d_k = l_k(y_w) - l_k(y_l)``;
- **the trust region forecast** (``audit_forecast``): each external reference's level gap to the initialising one
  against the width of the CTRO band, the clip rate the loss will see at the configured settings and at other
  ``eps`` / ``align="pair"`` / ``clip="off"``, and its severity on the one scale ``CLIP_SEVERITY``;
- **each external reference against the start** (``audit_lever``): where it is on the label's side and more
  confident than the start, where it is less confident, its label agreement minus the start's with a paired
  interval, and whether its margins only follow the answers' length; a reference whose level says it is
  untrained or unrelated to the text is named;
- **the weights alpha** each reference gets (mean, and how often one reference takes more than 0.9 of a pair);
- **agreement between references**, so near-duplicates and contrarians stand out;
- **suspect pairs** (``audit_suspects``): pairs whose label the references confidently contradict, candidates
  for label noise;
- **a verdict in plain words** with the knobs that change it, and an overall sentence that accounts for every
  external reference. With K = 1 there is nothing to compare: the run is plain DPO.

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

from mrpo.audit_forecast import (
    SATURATED_CLIP_RATE,
    band_half_width,
    clip_band,
    clip_forecast,
    clip_severity,
    loss_view,
)
from mrpo.audit_lever import (
    LengthTracking,
    StartComparison,
    compare_with_start,
    length_sentence,
    length_tracking,
    lever_sentence,
)
from mrpo.audit_stats import Rate, correlation
from mrpo.audit_suspects import SUSPECT_THRESHOLD, SuspectPair, find_suspects
from mrpo.config.schema import LossConfig
from mrpo.losses import MRPOOutput

ALPHA_DOMINANCE = 0.9
"""A reference "takes" a pair when its weight on it exceeds this."""

NEAR_IDENTICAL_GAP = 0.05
"""Mean |l_j(y) - l_k(y)| in nats below which two references are near-identical..."""

NEAR_IDENTICAL_SHARE = 0.99
"""...when they also prefer the same answer on at least this share of pairs (``near_identical``)."""

UNRELATED_GAP_PER_TOKEN = 3.0
"""An external reference whose log-probs sit this many nats per token (or more) below the initialising one's looks
untrained or unrelated to the text (a random model pays about log(vocabulary) ~ 10-12 nats a token, a trained small
model 1-3)."""


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
    mean_logp: float
    """Mean sequence log-prob over both responses of every pair (nats)."""
    alpha_mean: float | None
    """Mean weight alpha; None when K = 1 (alpha is 1 by construction)."""
    alpha_dominant: float | None
    """Share of pairs where this reference's weight exceeds ALPHA_DOMINANCE; None when K = 1."""
    level_gap: float | None = None
    """Mean l_k(y) - l_1(y) over both responses (nats); None for the initialising reference."""
    mean_abs_level_gap: float | None = None
    level_gap_per_token: float | None = None
    """Mean l_k(y) / n_k(y) - l_1(y) / n_1(y) over both responses, each on its own tokenization (nats per token)."""
    clip_rate: float | None = None
    """At the configured settings (None for the initialising reference)."""
    clip_severity: str | None = None
    """``clip_severity(clip_rate)``; None for the initialising reference and with clipping off."""
    clip_alternatives: dict[str, float] = field(default_factory=dict)
    versus_start: StartComparison | None = None
    """Its margins against the initialising reference's (None for the initialising reference itself)."""
    length: LengthTracking | None = None
    """How its margins follow the answers' length in characters (None when the lengths were not given)."""

    @property
    def looks_unrelated(self) -> bool:
        """Its log-probs sit UNRELATED_GAP_PER_TOKEN nats a token or more below the initialising reference's."""
        gap = self.level_gap_per_token
        return gap is not None and gap <= -UNRELATED_GAP_PER_TOKEN


@dataclass
class SplitAudit:
    """The audit of one split: per reference, between references, the forecast, and the suspect pairs."""

    split: str
    pairs: int
    loss: dict[str, Any]
    references: list[ReferenceAudit]
    band_half_width: float | None
    """Mean half-width of the CTRO band in nats at the configured settings (None when K = 1)."""
    clip_rate: float | None
    """Mean over pairs of the per-pair clip rate: what training logs as ``ctro/clip_rate`` (None when K = 1)."""
    clip_saturation: float
    """The clip rate from which an external reference counts as clipped away (``diagnostics.clip_saturation``)."""
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
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    suspect_threshold: float = SUSPECT_THRESHOLD,
    clip_saturation: float = SATURATED_CLIP_RATE,
) -> SplitAudit:
    """Audit the K cached references of one split.

    Args:
        names: the K reference names, the initialising one first.
        pair_ids: the N pairs, aligned with the columns.
        reference_chosen, reference_rejected: ``(K, N)`` cached sequence log-probs.
        chosen_tokens, rejected_tokens: ``(K, N)`` completion token counts, each reference's own.
        loss: the configured loss (its clip, eps, align and weights decide the forecast).
        chosen_lengths, rejected_lengths: ``(N,)`` completion lengths in characters of the texts (the same for
            every reference), for the length comparison; without them it is left out.
        clip_saturation: the clip rate from which a reference is clipped away (``diagnostics.clip_saturation``).
    """
    num_references = len(names)
    if reference_chosen.shape != (num_references, len(pair_ids)):
        raise ValueError(
            f"reference columns {tuple(reference_chosen.shape)} do not match {num_references} references x "
            f"{len(pair_ids)} pairs"
        )
    policy_tokens = (chosen_tokens[0], rejected_tokens[0])  # the initialising reference's = the policy's (§7)
    configured = loss_view(reference_chosen, reference_rejected, loss, policy_tokens)
    margins = reference_chosen.double() - reference_rejected.double()
    lengths = None
    if chosen_lengths is not None and rejected_lengths is not None:
        lengths = rejected_lengths.double() - chosen_lengths.double()
    references = [
        _reference_audit(
            k, name, (reference_chosen, reference_rejected), (chosen_tokens, rejected_tokens), configured
        )
        for k, name in enumerate(names)
    ]
    for audit, margin in zip(references, margins, strict=True):
        audit.length = length_tracking(margin, lengths) if lengths is not None else None
    external = num_references > 1
    if external:
        forecast = clip_forecast(reference_chosen, reference_rejected, loss, policy_tokens)
        _add_forecast(references, forecast, loss, clip_saturation)
    result = SplitAudit(
        split=split,
        pairs=len(pair_ids),
        loss=dataclasses.asdict(loss),
        references=references,
        band_half_width=band_half_width(configured, reference_chosen.double(), reference_rejected.double())
        if external
        else None,
        clip_rate=float(configured.clip_rate.double().mean()) if external and len(pair_ids) else None,
        clip_saturation=clip_saturation,
        pairwise=pairwise_agreement(names, reference_chosen, reference_rejected),
        suspects=find_suspects(margins, names, pair_ids, suspect_threshold),
        suspect_threshold=suspect_threshold,
        verdict=[],
    )
    result.verdict = verdict(result)
    return result


def _add_forecast(
    references: list[ReferenceAudit],
    forecast: dict[str, list[float]],
    loss: LossConfig,
    clip_saturation: float,
) -> None:
    """Each external reference's clip rates and the severity of the configured one."""
    for k, audit in enumerate(references[1:], start=1):
        audit.clip_rate = forecast["configured"][k]
        audit.clip_alternatives = {setting: rates[k] for setting, rates in forecast.items()}
        audit.clip_severity = clip_severity(audit.clip_rate, clip_saturation) if loss.clip != "off" else None


def _reference_audit(
    k: int,
    name: str,
    logps: tuple[torch.Tensor, torch.Tensor],
    tokens: tuple[torch.Tensor, torch.Tensor],
    configured: MRPOOutput,
) -> ReferenceAudit:
    """Reference ``k``'s agreement with the labels, margins, weights, level gap and comparison with the start (its
    clip rates come from the forecast, its length tracking from the caller)."""
    chosen, rejected = logps[0][k].double(), logps[1][k].double()
    chosen_per_token = chosen / tokens[0][k].clamp(min=1)
    rejected_per_token = rejected / tokens[1][k].clamp(min=1)
    margin = chosen - rejected
    several = logps[0].shape[0] > 1
    audit = ReferenceAudit(
        name=name,
        index=k + 1,
        label_agreement=Rate.of(margin > 0),
        label_agreement_per_token=Rate.of(chosen_per_token > rejected_per_token),
        ties=int((margin == 0).sum()),
        mean_margin=float(margin.mean()),
        mean_abs_margin=float(margin.abs().mean()),
        mean_logp=float(torch.cat([chosen, rejected]).mean()),
        alpha_mean=float(configured.alpha[k].double().mean()) if several else None,
        alpha_dominant=float((configured.alpha[k] > ALPHA_DOMINANCE).double().mean()) if several else None,
    )
    if k > 0:
        start_chosen, start_rejected = logps[0][0].double(), logps[1][0].double()
        gaps = torch.cat([chosen - start_chosen, rejected - start_rejected])
        audit.level_gap = float(gaps.mean())
        audit.mean_abs_level_gap = float(gaps.abs().mean())
        start_per_token = torch.cat(
            [start_chosen / tokens[0][0].clamp(min=1), start_rejected / tokens[1][0].clamp(min=1)]
        )
        audit.level_gap_per_token = float(
            (torch.cat([chosen_per_token, rejected_per_token]) - start_per_token).mean()
        )
        audit.versus_start = compare_with_start(margin, start_chosen - start_rejected)
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
                    "margin_correlation": correlation(margins[j], margins[k]),
                    "mean_abs_level_difference": float(level.mean()),
                }
            )
    return rows


# ----------------------------------------------------------------------------------------------------------------
# The verdict in plain words
# ----------------------------------------------------------------------------------------------------------------


def _setting(loss: dict[str, Any]) -> str:
    if loss["clip"] == "off":
        return "with clipping off"
    mode = "adaptive " if loss["clip"] == "adaptive" else "fixed "
    aligned = ", align=pair" if loss["align"] == "pair" else ""
    return f"at {mode}eps {loss['eps']:g}{aligned}"


def _label(ref: ReferenceAudit) -> str:
    return f"reference {ref.index} ({ref.name!r})"


def verdict(audit: SplitAudit) -> list[str]:
    """Short sentences: what each reference will do in this run, and which knobs change it."""
    lines = []
    initialising = audit.references[0]
    if len(audit.references) == 1:
        lines.append(
            f"K = 1: plain DPO, nothing to compare (no external reference, so no alpha and no trust region). The "
            f"initialising reference ({initialising.name!r}) prefers the chosen answer on "
            f"{initialising.label_agreement.text()} of the {audit.pairs} pairs."
        )
    if initialising.length is not None and (
        sentence := length_sentence(_label(initialising), initialising.length, None)
    ):
        lines.append(sentence)
    for ref in audit.references[1:]:
        lines += _external_verdict(audit, ref)
    for ref in audit.references:
        if ref.alpha_dominant is not None and ref.alpha_dominant >= 0.5:
            lines.append(
                f"{_label(ref)} takes more than {ALPHA_DOMINANCE:.0%} of the weight on {ref.alpha_dominant:.0%} of "
                "pairs: its margins dwarf the others', so the virtual reference is mostly this one (fixed "
                "loss.weights spread it)."
            )
    if audit.suspects:
        lines.append(_suspects_sentence(audit))
    if len(audit.references) > 1:
        lines.append(_overall_sentence(audit))
    return lines


def _external_verdict(audit: SplitAudit, ref: ReferenceAudit) -> list[str]:
    """What one external reference will do: its clipping (or that it is a copy of the initialising one), whether it
    looks unrelated to the text, what it can change over the start, and whether its preferences mean anything."""
    label = _label(ref)
    identical = _near_identical(audit, audit.references[0].name, ref.name)
    if identical:
        return [
            f"{label} is near-identical to the initialising reference (mean level difference "
            f"{identical['mean_abs_level_difference']:.3f} nats, same preference on {identical['agreement']:.0%} "
            "of pairs): it changes nothing whatever the settings; use another model."
        ]
    lines = [_clip_sentence(audit, ref)]
    if ref.looks_unrelated:
        lines.append(_unrelated_sentence(audit, ref))
    lines.append(lever_sentence(label, ref.versus_start))
    start_length = audit.references[0].length
    if ref.length is not None and (sentence := length_sentence(label, ref.length, start_length)):
        lines.append(sentence)
    agreement = ref.label_agreement
    if agreement.low <= 0.5 <= agreement.high and not ref.looks_unrelated:
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


def _clip_sentence(audit: SplitAudit, ref: ReferenceAudit) -> str:
    """The reference's clip rate at the configured settings, its severity, and the clip rate at other knobs."""
    loss, label, alternatives = audit.loss, _label(ref), ref.clip_alternatives
    gap = (
        f"its log-probs sit {ref.mean_abs_level_gap:.1f} nats from the initialising reference's on average, the "
        f"trust region is ±{audit.band_half_width:.2f} nats wide"
    )
    if loss["clip"] == "off":
        return (
            f"{label} enters the loss unclipped (clip=off) with mean weight alpha {ref.alpha_mean:.2f}; "
            f"{gap.replace('the trust region is', 'a default trust region would be')}."
        )
    knobs = (
        f"Clipped share with loss.align=pair {alternatives['align=pair']:.0%}, loss.eps=1.0 "
        f"{alternatives['eps=1']:.0%}, loss.clip=off 0% (then its weight alpha averages {ref.alpha_mean:.2f})."
    )
    band = clip_band(ref.clip_rate, audit.clip_saturation)
    consequence = [
        f"mean weight alpha {ref.alpha_mean:.2f}.",
        f"on those log-probs the trust region puts a scaled copy of the start in its place ({gap}). {knobs}",
        f"what it gives the loss is a scaled copy of the start's log-probs ({gap}). {knobs}",
    ][band]
    return (
        f"{label}: {ref.clip_severity} — clipped on {ref.clip_rate:.0%} of its log-probs {_setting(loss)}; "
        f"{consequence}"
    )


def _unrelated_sentence(audit: SplitAudit, ref: ReferenceAudit) -> str:
    """The warning for a reference whose level says it has not learnt this kind of text."""
    start, agreement = audit.references[0], ref.label_agreement
    chance = "near chance" if agreement.low <= 0.5 <= agreement.high else "not chance, though"
    return (
        f"{_label(ref)} looks untrained or unrelated to this text: its mean log-prob is {ref.mean_logp:.0f} nats "
        f"against the start's {start.mean_logp:.0f} ({ref.level_gap:+.0f} nats a sequence, "
        f"{ref.level_gap_per_token:+.1f} a token), it agrees with the labels on {agreement.text()} ({chance}), yet "
        f"its large margins take a mean alpha of {ref.alpha_mean:.2f}. Check that it is the model you meant."
    )


def _overall_sentence(audit: SplitAudit) -> str:
    """One sentence that accounts for every external reference: DPO only when all of them are out of the loss."""
    parts, entering = [], []
    for ref in audit.references[1:]:
        if _near_identical(audit, audit.references[0].name, ref.name):
            parts.append(f"{_label(ref)} is near-identical to the start")
            continue
        text = f"{_label(ref)} {ref.clip_severity} ({ref.clip_rate:.0%} clipped)"
        if ref.clip_severity is None:  # clipping off
            text = f"{_label(ref)} enters the loss unclipped"
        if ref.looks_unrelated:
            text += ", looks untrained"
        if ref.length is not None and ref.length.length_prior:
            text += ", a length prior"
        parts.append(text)
        if audit.loss["clip"] == "off" or clip_band(ref.clip_rate, audit.clip_saturation) < 2:
            entering.append(ref)
    listed = "; ".join(parts)
    if not entering:
        return (
            f"Overall: {listed}: no external reference reaches the loss, so this run would train almost exactly as "
            "DPO against the initialising reference. Widen the trust region (loss.eps, loss.align=pair) or turn it "
            "off (loss.clip=off) to let them in."
        )
    through = " and ".join(f"reference {r.index}" for r in entering)
    knows = ", ".join(f"reference {r.index} on {r.versus_start.knows_more.value:.0%}" for r in entering)
    return (
        f"Overall: {listed}. The run differs from DPO through {through} ({len(entering)} of "
        f"{len(audit.references) - 1} external), and can add knowledge only where it is on the label's side and "
        f"more confident than the start ({knows} of pairs)."
    )


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


def near_identical(row: dict[str, Any]) -> bool:
    """Whether a ``pairwise_agreement`` row is two near-identical references: the one rule behind inspect's verdict
    and the live warning before the first step (``diagnostics.TrainingWatcher.check_references``)."""
    return row["mean_abs_level_difference"] < NEAR_IDENTICAL_GAP and row["agreement"] >= NEAR_IDENTICAL_SHARE


def _near_identical(audit: SplitAudit, first: str, second: str) -> dict[str, Any] | None:
    rows = (row for row in audit.pairwise if row["references"] == [first, second] and near_identical(row))
    return next(rows, None)


# ----------------------------------------------------------------------------------------------------------------
# The terminal summary
# ----------------------------------------------------------------------------------------------------------------


def format_audit(audit: SplitAudit) -> str:
    """A fixed-width table per reference, each external one against the start, the length comparison, the
    pairwise agreement, and the verdict. With K = 1 the alpha and trust-region columns are left out."""
    several = len(audit.references) > 1
    header = f"{'reference':<18}{'agrees w/ labels (95% CI)':>30}{'per token':>11}{'margin':>9}"
    if several:
        header += f"{'gap':>8}{'clip':>7}{'alpha':>7}{'>0.9':>6}"
    lines = [
        f"[{audit.split}] {audit.pairs} pairs; loss {_setting(audit.loss)}, weights {audit.loss['weights']}"
    ]
    if not several:
        lines[0] = f"[{audit.split}] {audit.pairs} pairs; K = 1: plain DPO, nothing to compare"
    lines.append(header)
    for ref in audit.references:
        row = (
            f"{f'{ref.index} {ref.name}':<18}{ref.label_agreement.text():>30}"
            f"{ref.label_agreement_per_token.value:>11.1%}{ref.mean_margin:>+9.2f}"
        )
        if several:
            gap = f"{ref.level_gap:+.1f}" if ref.level_gap is not None else "–"
            clip = f"{ref.clip_rate:.0%}" if ref.clip_rate is not None else "–"
            row += f"{gap:>8}{clip:>7}{ref.alpha_mean:>7.2f}{ref.alpha_dominant:>6.0%}"
        lines.append(row)
    if several:
        lines += _forecast_lines(audit)
    if audit.references[0].length is not None:
        lines.append("margin against the length difference (characters, len(rejected) - len(chosen)):")
        for ref in audit.references:
            lines.append(
                f"  {ref.index} {ref.name}: correlation {_correlation(ref.length.correlation)}, the shorter answer wins on "
                f"{ref.length.shorter_wins.text()}"
            )
    lines.append("verdict:")
    lines.extend(f"  - {line}" for line in audit.verdict)
    return "\n".join(lines)


def _forecast_lines(audit: SplitAudit) -> list[str]:
    """The trust region's forecast by setting, each external reference against the start, the pairwise rows."""
    lines = [
        f"CTRO band: ±{audit.band_half_width:.2f} nats on average; forecast ctro/clip_rate {audit.clip_rate:.1%}"
    ]
    settings = list(audit.references[1].clip_alternatives)
    lines.append("clip rate by setting: " + ", ".join(settings))
    for ref in audit.references[1:]:
        rates = " ".join(f"{ref.clip_alternatives[s]:.0%}" for s in settings)
        lines.append(f"  {ref.index} {ref.name}: {rates}")
    lines.append("against the start (reference 1), paired on the same pairs:")
    for ref in audit.references[1:]:
        versus = ref.versus_start
        lines.append(
            f"  {ref.index} {ref.name}: label's side and beyond the start {versus.knows_more.text()}; less "
            f"confident {versus.less_confident.text()}; label agreement {versus.agreement_difference.text()} "
            "(Newcombe, paired)"
        )
    for row in audit.pairwise:
        lines.append(
            f"pair {row['references'][0]} / {row['references'][1]}: same preference on {row['agreement']:.0%}, "
            f"margin correlation {_correlation(row['margin_correlation'])}, level difference "
            f"{row['mean_abs_level_difference']:.1f} nats"
        )
    return lines


def _correlation(value: float) -> str:
    """A correlation for the table, to two decimals; "n/a" where it is undefined (a constant margin). Not
    ``formatting.signed``: a correlation is always a number, and "—" there means a value that was not logged."""
    return "n/a" if math.isnan(value) else f"{value:+.2f}"
