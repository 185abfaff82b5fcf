"""The reference audit (`mrpo inspect`): statistics computed by hand, the clip forecast against the loss, suspect
pairs, and the verdict on crafted references (saturated, near-identical, contrarian, dominant)."""

from __future__ import annotations

import math

import pytest
import torch

from mrpo.audit import audit_split, format_audit
from mrpo.audit_forecast import clip_forecast, clip_rates, clip_severity, loss_view
from mrpo.audit_stats import Rate, paired_difference, wilson_interval
from mrpo.audit_suspects import find_suspects, suspect_scores
from mrpo.config.schema import LossConfig
from mrpo.losses import mrpo_loss


def test_wilson_interval_matches_hand_computation():
    # 5 of 10, z = 1.96: centre (0.5 + 0.19208) / 1.38415 = 0.5, half = 1.96 * sqrt(0.025 + 0.0096040) / 1.38415
    low, high = wilson_interval(5, 10)
    half = 1.959963984540054 * math.sqrt(0.025 + 1.959963984540054**2 / 400) / (1 + 1.959963984540054**2 / 10)
    assert low == pytest.approx(0.5 - half) and high == pytest.approx(0.5 + half)
    assert low == pytest.approx(0.2366, abs=1e-4)
    # Never outside [0, 1], even at the ends where the normal interval would be.
    assert wilson_interval(0, 7)[0] == 0.0 and wilson_interval(7, 7)[1] == 1.0
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    rate = Rate.of(torch.tensor([True, True, False, True]))
    assert (rate.value, rate.count, rate.total) == (0.75, 3, 4)


def _columns(seed: int = 0, pairs: int = 64, gap: float = 6.0):
    generator = torch.Generator().manual_seed(seed)
    init_chosen = -10 - 5 * torch.rand(pairs, generator=generator)
    init_rejected = init_chosen - 2 + 4 * torch.rand(pairs, generator=generator)
    external_chosen = init_chosen - gap + torch.randn(pairs, generator=generator)
    external_rejected = init_rejected - gap + torch.randn(pairs, generator=generator)
    return torch.stack([init_chosen, external_chosen]), torch.stack([init_rejected, external_rejected])


@pytest.mark.parametrize(
    "loss",
    [
        LossConfig(),
        LossConfig(eps=0.5, align="pair"),
        LossConfig(clip="fixed", eps=0.3),
        LossConfig(clip="off"),
        LossConfig(weights=[0.2, 0.8], aggregation="geometric"),
    ],
)
def test_clip_forecast_is_the_loss_own_clip_rate(loss: LossConfig):
    chosen, rejected = _columns()
    policy = -1 - torch.rand(64, dtype=torch.float32)  # any valid policy: clipping does not depend on it
    trained = mrpo_loss(
        policy, policy - 1, chosen, rejected, **loss.__dict__
    )  # any policy: clipping ignores it
    forecast = clip_rates(loss_view(chosen, rejected, loss))
    assert forecast[0] == 0.0
    per_pair = (trained.clipped_chosen[1].float() + trained.clipped_rejected[1].float()) / 2
    assert forecast[1] == pytest.approx(float(per_pair.mean()), abs=0)
    assert clip_forecast(chosen, rejected, loss)["configured"] == forecast
    audit = audit_split(
        "train",
        ["init", "ext"],
        [str(i) for i in range(64)],
        chosen,
        rejected,
        torch.full((2, 64), 5),
        torch.full((2, 64), 5),
        loss,
    )
    assert audit.clip_rate == pytest.approx(float(trained.clip_rate.double().mean()), abs=1e-12)


def test_length_normalized_forecast_divides_by_the_initialising_reference_token_counts():
    chosen, rejected = _columns(gap=1.0)  # partly clipped: adaptive eps moves with the per-token levels
    tokens = torch.stack(
        [torch.arange(1, 65), torch.full((64,), 7)]
    )  # the start's counts, then the external's
    rejected_tokens = torch.stack([torch.arange(64, 0, -1), torch.full((64,), 9)])
    loss = LossConfig(length_normalize=True, eps=0.3)
    policy = -1 - torch.rand(64, dtype=torch.float32)
    trained = mrpo_loss(policy, policy - 1, chosen, rejected, **loss.__dict__, chosen_tokens=tokens[0],
                        rejected_tokens=rejected_tokens[0])  # fmt: skip
    audit = audit_split("train", ["init", "ext"], [str(i) for i in range(64)], chosen, rejected, tokens,
                        rejected_tokens, loss)  # fmt: skip
    assert audit.clip_rate == pytest.approx(float(trained.clip_rate.double().mean()), abs=1e-12)
    summed = clip_rates(loss_view(chosen, rejected, LossConfig(eps=0.3)))
    assert clip_rates(loss_view(chosen, rejected, loss, (tokens[0], rejected_tokens[0]))) != summed
    with pytest.raises(ValueError, match="needs chosen_tokens"):
        loss_view(chosen, rejected, loss)


def test_a_reference_far_from_the_initialising_one_is_forecast_as_dpo():
    chosen, rejected = _columns(gap=6.0)
    audit = audit_split(
        "train",
        ["init", "gemma"],
        [str(i) for i in range(64)],
        chosen,
        rejected,
        torch.full((2, 64), 8),
        torch.full((2, 64), 9),
        LossConfig(),
    )
    external = audit.references[1]
    assert external.clip_rate > 0.9
    assert external.level_gap == pytest.approx(-6.0, abs=0.5)
    assert external.clip_alternatives["clip=off"] == 0.0
    # Alignment removes the common level: only the margin difference is left, so it clips less.
    assert external.clip_alternatives["align=pair"] < external.clip_rate
    # A wider band never clips more.
    sweep = [external.clip_alternatives[f"eps={eps:g}"] for eps in (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)]
    assert sweep == sorted(sweep, reverse=True)
    text = " ".join(audit.verdict)
    assert "reference 2 ('gemma'): clipped away ≈ DPO — clipped on" in text
    assert "almost exactly as DPO" in text and "loss.align=pair" in text and "loss.clip=off" in text
    assert external.clip_severity == "clipped away ≈ DPO"
    # The band width is eps_y |l_1(y)| averaged: adaptive eps 0.1 splits into about 0.05 per response here.
    assert audit.band_half_width == pytest.approx(
        0.05 * float(torch.cat([chosen[0], rejected[0]]).abs().mean()), rel=0.1
    )


def test_near_identical_and_contrarian_references_are_named():
    chosen = -10 - 5 * torch.rand(1, 64, generator=torch.Generator().manual_seed(1))
    rejected = (
        chosen - 1 - torch.rand(1, 64, generator=torch.Generator().manual_seed(2))
    )  # init agrees always
    names = ["init", "copy", "contrarian"]
    chosen3 = torch.stack([chosen[0], chosen[0] + 0.001, rejected[0]])
    rejected3 = torch.stack([rejected[0], rejected[0] + 0.001, chosen[0]])
    tokens = torch.full((3, 64), 4)
    audit = audit_split(
        "train", names, [str(i) for i in range(64)], chosen3, rejected3, tokens, tokens, LossConfig()
    )
    text = " ".join(audit.verdict)
    assert "reference 2 ('copy') is near-identical to the initialising reference" in text
    assert "reference 3 ('contrarian') prefers the *rejected* answer" in text
    pair = next(row for row in audit.pairwise if row["references"] == ["init", "contrarian"])
    assert pair["agreement"] == 0.0 and pair["margin_correlation"] == pytest.approx(-1.0)


def test_a_reference_with_huge_margins_takes_the_weight():
    chosen, rejected = _columns()
    rejected = torch.stack([rejected[0], rejected[1] - 50])  # external margins of +50 nats dwarf the init's
    audit = audit_split(
        "train",
        ["init", "big"],
        [str(i) for i in range(64)],
        chosen,
        rejected,
        torch.ones(2, 64),
        torch.ones(2, 64),
        LossConfig(clip="off"),
    )
    assert audit.references[1].alpha_dominant > 0.9
    assert "takes more than 90% of the weight" in " ".join(audit.verdict)


def test_suspect_scores_by_hand():
    # Two references, four pairs. Median |d| of reference 1: median(2, 4, 1, 3) = 2.5 (torch takes the lower
    # middle: 2); of reference 2: median(10, 20, 5, 1) -> 5.
    margins = torch.tensor([[2.0, -4.0, -1.0, 3.0], [10.0, -20.0, 5.0, -1.0]])
    scores_all = suspect_scores(margins, [0, 1])
    # pair 0: min(-2/2, -10/5) = -2; pair 1: min(4/2, 20/5) = 2; pair 2: min(1/2, -5/5) = -1;
    # pair 3: min(-3/2, 1/5) = -1.5
    assert scores_all.tolist() == pytest.approx([-2.0, 2.0, -1.0, -1.5])
    assert suspect_scores(margins, [1]).tolist() == pytest.approx([-2.0, 4.0, -1.0, 0.2])
    suspects = find_suspects(margins, ["init", "ext"], ["a", "b", "c", "d"], threshold=1.0)
    assert [s.pair_id for s in suspects] == ["b"]
    assert suspects[0].flagged_by == ["all", "external"]
    assert suspects[0].margins == {"init": -4.0, "ext": -20.0}
    # A lower threshold lets the external reference's mild contradiction of pair d in, ranked after b.
    assert [s.pair_id for s in find_suspects(margins, ["init", "ext"], list("abcd"), threshold=0.1)] == [
        "b",
        "d",
    ]


def test_one_reference_is_dpo_and_flags_by_itself():
    margins_chosen = torch.tensor([[-1.0, -2.0, -9.0, -1.5]])
    margins_rejected = torch.tensor([[-3.0, -4.0, -1.0, -3.0]])
    audit = audit_split(
        "train",
        ["init"],
        list("abcd"),
        margins_chosen,
        margins_rejected,
        torch.ones(1, 4),
        torch.ones(1, 4),
        LossConfig(),
    )
    assert audit.verdict[0].startswith("K = 1: plain DPO, nothing to compare")
    assert [s.pair_id for s in audit.suspects] == ["c"] and audit.suspects[0].flagged_by == ["all"]
    assert audit.to_json()["suspects"] == {
        "threshold": 1.0,
        "count": 1,
        "flagged_by_external": 0,
        "flagged_by_all": 1,
    }


def test_per_token_agreement_uses_each_reference_own_token_counts():
    chosen = torch.tensor([[-10.0, -10.0]])
    rejected = torch.tensor([[-12.0, -12.0]])
    # Sequence: both pairs agree. Per token: pair 0 has 10 chosen vs 20 rejected tokens -> -1.0 vs -0.6: disagrees.
    audit = audit_split(
        "train",
        ["init"],
        ["a", "b"],
        chosen,
        rejected,
        torch.tensor([[10, 2]]),
        torch.tensor([[20, 2]]),
        LossConfig(),
    )
    ref = audit.references[0]
    assert ref.label_agreement.value == 1.0
    assert ref.label_agreement_per_token.value == 0.5


# ----------------------------------------------------------------------------------------------------------------
# Each external reference against the start (docs/method.md, "What a reference can change")
# ----------------------------------------------------------------------------------------------------------------


def test_paired_difference_by_hand_and_against_the_normal_interval():
    # a = 5 pairs both true, b = 3 first only, c = 1 second only, d = 1 neither: D = (3 - 1) / 10 = 0.2.
    first = torch.tensor([True] * 5 + [True] * 3 + [False] * 1 + [False] * 1)
    second = torch.tensor([True] * 5 + [False] * 3 + [True] * 1 + [False] * 1)
    result = paired_difference(first, second)
    l1, u1 = wilson_interval(8, 10)
    l2, u2 = wilson_interval(6, 10)
    phi = (5 * 1 - 3 * 1) / math.sqrt(8 * 2 * 6 * 4)
    delta = math.sqrt((0.8 - l1) ** 2 - 2 * phi * (0.8 - l1) * (u2 - 0.6) + (u2 - 0.6) ** 2)
    epsilon = math.sqrt((u1 - 0.8) ** 2 - 2 * phi * (u1 - 0.8) * (0.6 - l2) + (0.6 - l2) ** 2)
    assert result.value == pytest.approx(0.2)
    assert (result.low, result.high) == pytest.approx((0.2 - delta, 0.2 + epsilon))
    assert result.pairs == 10 and "Newcombe" in result.method
    # At large n it meets the normal interval of a paired difference: D +- z sqrt((b + c)/n^2 - (b - c)^2/n^3).
    n, b, c = 4000, 600, 400
    first = torch.tensor([True] * b + [False] * c + [True] * 1000 + [False] * (n - b - c - 1000))
    second = torch.tensor([False] * b + [True] * c + [True] * 1000 + [False] * (n - b - c - 1000))
    wide = paired_difference(first, second)
    half = 1.959963984540054 * math.sqrt((b + c) / n**2 - (b - c) ** 2 / n**3)
    assert wide.value == pytest.approx(0.05)
    assert wide.low == pytest.approx(0.05 - half, abs=1e-3) and wide.high == pytest.approx(
        0.05 + half, abs=1e-3
    )
    # The same indicators: no difference, and an interval that shrinks to it.
    same = paired_difference(first, first)
    assert same.value == 0.0 and same.low <= 0.0 <= same.high and same.high - same.low < 1e-3
    assert wide.text() == f"+5.0 points [{100 * wide.low:+.1f}, {100 * wide.high:+.1f}]"


def _with_margins(start_margin: torch.Tensor, *external_margins: torch.Tensor, level: float = -30.0):
    """Columns for K = 1 + len(external_margins) references at the same level: l(y_w) = level, l(y_l) = level - d."""
    margins = torch.stack([start_margin, *external_margins]).float()
    chosen = torch.full_like(margins, level)
    return chosen, chosen - margins


UNCLIPPED = LossConfig(clip="off")


def _audit(chosen, rejected, names=None, loss=UNCLIPPED, **kwargs):
    count = chosen.shape[1]
    names = names or ["init", *(f"ext{k}" for k in range(1, chosen.shape[0]))]
    tokens = torch.full(chosen.shape, 20)
    return audit_split(
        "train", names, [str(i) for i in range(count)], chosen, rejected, tokens, tokens, loss, **kwargs
    )


def test_a_reference_that_knows_more_than_the_start_on_half_the_pairs():
    generator = torch.Generator().manual_seed(3)
    start = torch.where(
        torch.rand(400, generator=generator) < 0.6, 1.0, -1.0
    )  # agrees with the labels on ~60%
    # The first half: on the label's side and beyond the start; the second half: exactly the start's margin.
    external = torch.cat([start[:200].abs() + 2.0, start[200:]])
    audit = _audit(*_with_margins(start, external))
    versus = audit.references[1].versus_start
    assert versus.knows_more.value == 0.5 and versus.knows_more.low > 0.4
    assert versus.less_confident.value == 0.0
    expected = float((external > 0).double().mean() - (start > 0).double().mean())
    assert versus.agreement_difference.value == pytest.approx(expected) and expected > 0.1
    assert versus.agreement_difference.low > 0
    text = " ".join(audit.verdict)
    assert (
        "reference 2 ('ext1') is on the label's side and more confident than the start on 50% of pairs: it can add"
        in text
    )
    assert f"label agreement {versus.agreement_difference.text()} against the start's" in text
    assert audit.to_json()["references"][1]["versus_start"]["knows_more"]["value"] == 0.5
    assert audit.references[0].versus_start is None


def test_a_less_confident_reference_can_only_reweight_by_the_start_margins():
    start = torch.linspace(-2, 6, 100)
    audit = _audit(*_with_margins(start, 0.3 * start))
    versus = audit.references[1].versus_start
    assert versus.less_confident.value == 1.0
    assert versus.knows_more.value == 0.0 and versus.agreement_difference.value == 0.0
    assert "reference 2 ('ext1') is less confident than the initialising model on 100% of pairs: it can only " \
        "reweight pairs by the start's own margins" in " ".join(audit.verdict)  # fmt: skip


def test_a_reference_whose_margin_is_the_length_difference_is_a_length_prior():
    generator = torch.Generator().manual_seed(4)
    chosen_lengths = torch.randint(20, 400, (200,), generator=generator)
    rejected_lengths = torch.randint(20, 400, (200,), generator=generator)
    start = torch.randn(200, generator=generator)  # knows nothing about length
    external = 0.05 * (rejected_lengths - chosen_lengths).float() + 0.01  # the shorter answer is more likely
    columns = _with_margins(start, external)
    audit = _audit(*columns, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    start_length, length = audit.references[0].length, audit.references[1].length
    assert length.correlation == pytest.approx(1.0, abs=1e-6) and length.length_prior
    differ = rejected_lengths != chosen_lengths
    assert length.shorter_wins.value == 1.0 and length.shorter_wins.total == int(differ.sum())
    assert abs(start_length.correlation) < 0.3 and not start_length.length_prior
    text = " ".join(audit.verdict)
    assert "reference 2 ('ext1')'s margins follow the answers' length (correlation 1.00; the shorter answer wins on " \
        "100% of pairs; the start" in text and "a length prior, not knowledge" in text  # fmt: skip
    assert (
        f"100% of pairs; the start's: correlation {start_length.correlation:.2f}, the shorter answer" in text
    )
    printed = format_audit(audit)
    assert "margin against the length difference" in printed and "correlation +1.00" in printed
    # A start that is itself a length prior is named too (at HH-RLHF scale both references are).
    both = _audit(
        *_with_margins(external, external), chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths
    )
    assert "reference 1 ('init')'s margins follow the answers' length (correlation 1.00" in " ".join(
        both.verdict
    )
    # Without the texts' lengths there is no length comparison, and no claim about it.
    plain = _audit(*columns)
    assert plain.references[1].length is None and "length prior" not in " ".join(plain.verdict)


def test_a_near_random_reference_is_called_untrained_with_the_alpha_it_takes():
    # Start: ~-60 nats a sequence over 40 tokens (-1.5 a token). The external: ~-405 nats (-10 a token, a random
    # model's level) with margins of tens of nats that ignore the labels, so ARWC hands it most of the weight.
    generator = torch.Generator().manual_seed(5)
    start_chosen = -60 + torch.randn(300, generator=generator)
    start_rejected = start_chosen - 2 + torch.randn(300, generator=generator)
    random_chosen = -405 + 30 * torch.randn(300, generator=generator)
    random_rejected = -405 + 30 * torch.randn(300, generator=generator)
    chosen = torch.stack([start_chosen, random_chosen])
    rejected = torch.stack([start_rejected, random_rejected])
    tokens = torch.stack([torch.full((300,), 40), torch.full((300,), 40)])
    audit = audit_split(
        "train",
        ["init", "random"],
        [str(i) for i in range(300)],
        chosen,
        rejected,
        tokens,
        tokens,
        LossConfig(),
    )
    ref = audit.references[1]
    assert ref.looks_unrelated and ref.level_gap_per_token == pytest.approx(-345 / 40, abs=0.5)
    assert ref.alpha_mean > 0.6
    warning = next(line for line in audit.verdict if "looks untrained or unrelated" in line)
    assert warning.startswith("reference 2 ('random') looks untrained or unrelated to this text")
    assert (
        f"mean log-prob is {ref.mean_logp:.0f} nats against the start's {audit.references[0].mean_logp:.0f}"
        in warning
    )
    assert f"{ref.level_gap_per_token:+.1f} a token" in warning and "(near chance)" in warning
    assert f"a mean alpha of {ref.alpha_mean:.2f}" in warning
    assert "looks untrained" in audit.verdict[-1]  # the overall sentence names it too
    # A reference of another family a few nats away (the demo's Gemma) is not called untrained.
    near, far = _columns(gap=6.0)
    assert not _audit(near, far, loss=LossConfig()).references[1].looks_unrelated


def _partly_clipped_columns(pairs: int = 100, clipped: int = 67, start_level: float = -20.0):
    """An external reference 10 nats below the start on ``clipped`` pairs (outside a fixed band of +-2 nats at eps
    0.1) and 0.5 nats below on the rest (inside): its clip rate is exactly clipped / pairs."""
    start_chosen = torch.full((pairs,), start_level)
    start_rejected = start_chosen - 1.0
    offset = torch.where(torch.arange(pairs) < clipped, 10.0, 0.5)
    return (
        torch.stack([start_chosen, start_chosen - offset]),
        torch.stack([start_rejected, start_rejected - offset]),
    )


def test_one_scale_of_clip_severity():
    assert [clip_severity(r) for r in (0.0, 0.24, 0.25, 0.67, 0.89, 0.9, 1.0)] == [
        "enters the loss",
        "enters the loss",
        "enters the loss only partly",
        "enters the loss only partly",
        "enters the loss only partly",
        "clipped away ≈ DPO",
        "clipped away ≈ DPO",
    ]
    # diagnostics.clip_saturation moves the top boundary, and the partial band never lies above it.
    assert clip_severity(0.67, saturated=0.6) == "clipped away ≈ DPO"
    assert clip_severity(0.21, saturated=0.2) == "clipped away ≈ DPO"
    chosen, rejected = _partly_clipped_columns()
    fixed = LossConfig(clip="fixed", eps=0.1)
    audit = _audit(chosen, rejected, loss=fixed)
    assert audit.references[1].clip_rate == pytest.approx(0.67)
    assert audit.references[1].clip_severity == "enters the loss only partly"
    assert "reference 2 ('ext1'): enters the loss only partly — clipped on 67%" in " ".join(audit.verdict)
    strict = _audit(chosen, rejected, loss=fixed, clip_saturation=0.6)
    assert strict.references[1].clip_severity == "clipped away ≈ DPO" and strict.clip_saturation == 0.6


def test_the_overall_sentence_accounts_for_every_external_reference():
    partly_chosen, partly_rejected = _partly_clipped_columns()
    far_chosen, far_rejected = partly_chosen[1] - 30, partly_rejected[1] - 30  # clipped on every log-prob
    chosen = torch.stack([partly_chosen[0], far_chosen, partly_chosen[1]])
    rejected = torch.stack([partly_rejected[0], far_rejected, partly_rejected[1]])
    fixed = LossConfig(clip="fixed", eps=0.1)
    audit = _audit(chosen, rejected, names=["init", "far", "partly"], loss=fixed)
    assert [r.clip_severity for r in audit.references[1:]] == [
        "clipped away ≈ DPO",
        "enters the loss only partly",
    ]
    overall = audit.verdict[-1]
    assert overall.startswith("Overall: reference 2 ('far') clipped away ≈ DPO (100% clipped); reference 3 ('partly') "
                              "enters the loss only partly (67% clipped).")  # fmt: skip
    assert "The run differs from DPO through reference 3 (1 of 2 external)" in overall
    # No sentence says the run trains as DPO while reference 3 still enters the loss.
    assert not any("as DPO" in line for line in audit.verdict)
    # With both clipped away the overall sentence says DPO, once.
    both = _audit(chosen[:2], rejected[:2], names=["init", "far"], loss=fixed)
    assert [line for line in both.verdict if "almost exactly as DPO" in line] == [both.verdict[-1]]


def test_k1_is_plain_dpo_with_no_alpha_or_trust_region_figures():
    chosen, rejected = _with_margins(torch.tensor([1.0, 2.0, -1.0, 3.0]))
    audit = _audit(chosen, rejected, loss=LossConfig())
    assert audit.verdict[0].startswith("K = 1: plain DPO, nothing to compare")
    ref = audit.references[0]
    assert ref.alpha_mean is None and ref.alpha_dominant is None and ref.clip_rate is None
    assert audit.band_half_width is None and audit.clip_rate is None
    printed = format_audit(audit)
    assert "K = 1: plain DPO, nothing to compare" in printed.splitlines()[0]
    for absent in ("alpha", "clip", "CTRO", "gap", "against the start"):
        assert absent not in printed.split("verdict:")[0]
    assert not any("Overall" in line for line in audit.verdict)
