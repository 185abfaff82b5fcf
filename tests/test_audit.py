"""The reference audit (`mrpo inspect`): statistics computed by hand, the clip forecast against the loss, suspect
pairs, and the verdict on crafted references (saturated, near-identical, contrarian, dominant)."""

from __future__ import annotations

import math

import pytest
import torch

from mrpo.audit import (
    Rate,
    audit_split,
    clip_forecast,
    clip_rates,
    find_suspects,
    loss_view,
    suspect_scores,
    wilson_interval,
)
from mrpo.config import LossConfig
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
    assert "reference 2 ('gemma') will be clipped on" in text
    assert "almost exactly as DPO" in text and "loss.align=pair" in text and "loss.clip=off" in text
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
    assert audit.verdict[0].startswith("One reference ('init'): this run is DPO.")
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
