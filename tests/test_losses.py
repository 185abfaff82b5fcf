"""Tests of the MRPO loss against hand computation, DPO, the spec's invariants, extremes and bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mrpo.losses import (
    align_levels,
    clip_to_trust_region,
    dpo_loss,
    mrpo_loss,
    reference_weights,
    trust_region_eps,
    virtual_reference_logps,
)


def t(*values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


def softplus(x):
    return math.log1p(math.exp(x)) if x < 30 else x + math.log1p(math.exp(-x))


def dpo_reference(pw, pl, rw, rl, beta):
    """TRL-style DPO sigmoid loss, written independently: -log sigmoid(beta * ((pw - rw) - (pl - rl)))."""
    return -F.logsigmoid(beta * ((pw - rw) - (pl - rl)))


# ---------------------------------------------------------------------------------------------------------------
# Hand-computed examples
# ---------------------------------------------------------------------------------------------------------------


def test_hand_computed_k2_harmonic_adaptive():
    # One pair, K = 2, beta = 0.1.  policy: pw = -5, pl = -7.
    # references (initialising first): chosen l_1 = -6, l_2 = -4; rejected l_1 = -6.5, l_2 = -9.
    # §1: d_1 = -6 - (-6.5) = 0.5, d_2 = -4 - (-9) = 5
    #     alpha_1 = (0.5 + 1e-6) / (5.5 + 2e-6), alpha_2 = (5 + 1e-6) / (5.5 + 2e-6)
    alpha_1 = (0.5 + 1e-6) / (5.5 + 2e-6)
    alpha_2 = (5 + 1e-6) / (5.5 + 2e-6)
    assert alpha_1 == pytest.approx(0.0909093, abs=1e-6)
    # §2: b_w = (-6 - 4) / 2 = -5, b_l = (-6.5 - 9) / 2 = -7.75
    #     eps_w = 0.1 * 5 / 12.75 = 0.0392157, eps_l = 0.1 * 7.75 / 12.75 = 0.0607843
    eps_w, eps_l = 0.1 * 5 / 12.75, 0.1 * 7.75 / 12.75
    #     chosen band [-6 * (1 + eps_w), -6 * (1 - eps_w)] = [-6.2353, -5.7647]: l_2 = -4 -> -5.7647 (clipped)
    #     rejected band [-6.5 * (1 + eps_l), -6.5 * (1 - eps_l)] = [-6.8951, -6.1049]: l_2 = -9 -> -6.8951 (clipped)
    l2w_clipped = -6 * (1 - eps_w)
    l2l_clipped = -6.5 * (1 + eps_l)
    assert l2w_clipped == pytest.approx(-5.764706, abs=1e-6)
    assert l2l_clipped == pytest.approx(-6.895098, abs=1e-6)
    # §3: log r(y) = -log(alpha_1 exp(-l_1) + alpha_2 exp(-l'_2))
    log_r_w = -math.log(alpha_1 * math.exp(6) + alpha_2 * math.exp(-l2w_clipped))
    log_r_l = -math.log(alpha_1 * math.exp(6.5) + alpha_2 * math.exp(-l2l_clipped))
    # §4: z = beta * ((pw - pl) - (log r_w - log r_l)), loss = softplus(-z)
    z = 0.1 * ((-5 - -7) - (log_r_w - log_r_l))
    expected = softplus(-z)

    out = mrpo_loss(t(-5.0), t(-7.0), t(-6.0, -4.0).reshape(2, 1), t(-6.5, -9.0).reshape(2, 1), beta=0.1)
    assert out.loss.item() == pytest.approx(expected, abs=1e-10)
    assert out.alpha[:, 0].tolist() == pytest.approx([alpha_1, alpha_2], abs=1e-12)
    assert out.eps_chosen.item() == pytest.approx(eps_w) and out.eps_rejected.item() == pytest.approx(eps_l)
    assert out.virtual_chosen_logps.item() == pytest.approx(log_r_w, abs=1e-10)
    assert out.chosen_rewards.item() == pytest.approx(0.1 * (-5 - log_r_w), abs=1e-10)
    assert out.rejected_rewards.item() == pytest.approx(0.1 * (-7 - log_r_l), abs=1e-10)
    assert out.clip_rate.item() == 1.0  # both external log-probs were moved
    assert out.clipped_chosen[:, 0].tolist() == [False, True]


def test_hand_computed_k3_fixed_weights_fixed_clip_geometric_and_harmonic():
    # One pair, K = 3, beta = 0.5, fixed weights (2, 1, 1) -> alpha = (0.5, 0.25, 0.25), fixed eps = 0.2.
    # policy: pw = -10, pl = -12.
    # chosen:   l_1 = -10, l_2 = -11 (band [-12, -8]: inside), l_3 = -20 (-> -12, clipped)
    # rejected: l_1 = -11, l_2 = -13.5 (band [-13.2, -8.8]: -> -13.2, clipped), l_3 = -9 (inside)
    alpha = (0.5, 0.25, 0.25)
    chosen_clipped = (-10.0, -11.0, -12.0)
    rejected_clipped = (-11.0, -13.2, -9.0)

    def harmonic(values):
        return -math.log(sum(a * math.exp(-v) for a, v in zip(alpha, values, strict=True)))

    def geometric(values):
        return sum(a * v for a, v in zip(alpha, values, strict=True))

    inputs = (t(-10.0), t(-12.0), t(-10.0, -11.0, -20.0).reshape(3, 1), t(-11.0, -13.5, -9.0).reshape(3, 1))
    for aggregation, mean in (("harmonic", harmonic), ("geometric", geometric)):
        log_r_w, log_r_l = mean(chosen_clipped), mean(rejected_clipped)
        z = 0.5 * ((-10 - -12) - (log_r_w - log_r_l))
        out = mrpo_loss(*inputs, beta=0.5, weights=[2, 1, 1], clip="fixed", eps=0.2, aggregation=aggregation)
        assert out.loss.item() == pytest.approx(softplus(-z), abs=1e-10), aggregation
        assert out.clip_rate.item() == pytest.approx(0.5)  # 2 of the 4 external log-probs moved

    # MDPO: sum_k alpha_k softplus(-beta ((pw - pl) - (l'_k(w) - l'_k(l))))
    expected_mdpo = sum(
        a * softplus(-0.5 * (2 - (cw - cl)))
        for a, cw, cl in zip(alpha, chosen_clipped, rejected_clipped, strict=True)
    )
    out = mrpo_loss(*inputs, beta=0.5, weights=[2, 1, 1], clip="fixed", eps=0.2, aggregation="mdpo")
    assert out.loss.item() == pytest.approx(expected_mdpo, abs=1e-10)
    assert out.virtual_chosen_logps.item() == pytest.approx(geometric(chosen_clipped))


# ---------------------------------------------------------------------------------------------------------------
# Reductions to DPO
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("clip", ["adaptive", "fixed", "off"])
@pytest.mark.parametrize("weights", ["adaptive", [3.0]])
@pytest.mark.parametrize("aggregation", ["harmonic", "geometric", "mdpo"])
def test_single_reference_is_dpo(clip, weights, aggregation):
    g = torch.Generator().manual_seed(0)
    pw, pl, rw, rl = (-torch.rand(16, generator=g, dtype=torch.float64) * 50 for _ in range(4))
    out = mrpo_loss(
        pw, pl, rw[None], rl[None], beta=0.3, weights=weights, clip=clip, eps=0.7, aggregation=aggregation
    )
    torch.testing.assert_close(out.losses, dpo_reference(pw, pl, rw, rl, 0.3), rtol=0, atol=1e-8)
    torch.testing.assert_close(out.chosen_rewards, 0.3 * (pw - rw), rtol=0, atol=1e-8)
    torch.testing.assert_close(dpo_loss(pw, pl, rw, rl, beta=0.3).losses, out.losses, rtol=0, atol=1e-12)


@pytest.mark.parametrize("aggregation", ["harmonic", "geometric", "mdpo"])
def test_identical_references_are_dpo_for_any_alpha(aggregation):
    g = torch.Generator().manual_seed(1)
    pw, pl, rw, rl = (-torch.rand(8, generator=g, dtype=torch.float64) * 30 for _ in range(4))
    for weights in ("adaptive", [1, 0, 0, 0], [0.1, 0.2, 0.3, 0.4]):
        out = mrpo_loss(
            pw, pl, rw.expand(4, 8), rl.expand(4, 8), beta=0.1, weights=weights, aggregation=aggregation
        )
        torch.testing.assert_close(out.losses, dpo_reference(pw, pl, rw, rl, 0.1), rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------------
# Invariants of the building blocks
# ---------------------------------------------------------------------------------------------------------------


def random_references(k, b, seed=0, scale=40.0):
    g = torch.Generator().manual_seed(seed)
    return -torch.rand(k, b, generator=g, dtype=torch.float64) * scale, -torch.rand(
        k, b, generator=g, dtype=torch.float64
    ) * scale


def test_adaptive_alpha_sums_to_one_and_follows_its_own_reference():
    chosen, rejected = random_references(5, 32)
    alpha = reference_weights(chosen, rejected)
    torch.testing.assert_close(alpha.sum(0), torch.ones(32, dtype=torch.float64))
    # Make reference 3 (row 2) the only confident one on pair 0: its weight, and only its weight, approaches 1.
    chosen[:, 0], rejected[:, 0] = -10.0, -10.0
    rejected[2, 0] = -60.0
    alpha = reference_weights(chosen, rejected)
    assert alpha[2, 0] > 0.999999
    assert alpha[:, 0].argmax().item() == 2
    # Swapping two references swaps their weights: alpha_k is attached to reference k.
    swapped = reference_weights(chosen[[1, 0, 2, 3, 4]], rejected[[1, 0, 2, 3, 4]])
    torch.testing.assert_close(swapped, alpha[[1, 0, 2, 3, 4]])


def test_fixed_weights_are_normalised():
    chosen, rejected = random_references(3, 4)
    alpha = reference_weights(chosen, rejected, [1, 1, 2])
    torch.testing.assert_close(alpha[:, 2], t(0.25, 0.25, 0.5))


def test_adaptive_eps_splits_eps_max_and_clipped_values_lie_in_band():
    chosen, rejected = random_references(4, 64, seed=3, scale=300.0)
    eps_w, eps_l = trust_region_eps(chosen, rejected, "adaptive", 0.3)
    torch.testing.assert_close(eps_w + eps_l, torch.full((64,), 0.3, dtype=torch.float64))
    for logps, eps in ((chosen, eps_w), (rejected, eps_l)):
        clipped, moved = clip_to_trust_region(logps, eps)
        assert torch.equal(clipped[0], logps[0]) and not moved[0].any()
        low, high = (1 + eps) * logps[0], (1 - eps) * logps[0]
        assert ((clipped[1:] >= low - 1e-12) & (clipped[1:] <= high + 1e-12)).all()
        assert torch.equal(moved[1:], clipped[1:] != logps[1:])
        assert torch.equal(clipped[1:][~moved[1:]], logps[1:][~moved[1:]])


def test_adaptive_eps_degenerate_levels_split_evenly():
    zeros = torch.zeros(2, 3, dtype=torch.float64)
    eps_w, eps_l = trust_region_eps(zeros, zeros, "adaptive", 0.1)
    torch.testing.assert_close(eps_w, torch.full((3,), 0.05, dtype=torch.float64))
    torch.testing.assert_close(eps_l, eps_w)


def test_harmonic_virtual_reference_is_below_geometric():
    chosen, _ = random_references(6, 128, seed=4, scale=80.0)
    alpha = reference_weights(*random_references(6, 128, seed=5))
    harmonic = virtual_reference_logps(chosen, alpha, "harmonic")
    geometric = virtual_reference_logps(chosen, alpha, "geometric")
    assert (harmonic <= geometric + 1e-9).all()
    assert (harmonic < geometric - 1e-3).any()  # strict somewhere: the test could fail if the means coincided


def test_zero_weight_reference_drops_out_of_harmonic_mean():
    chosen, rejected = random_references(3, 5)
    pw, pl = -torch.rand(5, dtype=torch.float64), -torch.rand(5, dtype=torch.float64)
    with_zero = mrpo_loss(pw, pl, chosen, rejected, weights=[1, 0, 1], clip="off")
    without = mrpo_loss(pw, pl, chosen[[0, 2]], rejected[[0, 2]], weights=[1, 1], clip="off")
    torch.testing.assert_close(with_zero.losses, without.losses)


def test_level_alignment_keeps_margins_and_matches_initialising_level():
    chosen, rejected = random_references(3, 10, seed=7)
    aligned_chosen, aligned_rejected = align_levels(chosen, rejected, "pair")
    torch.testing.assert_close(aligned_chosen - aligned_rejected, chosen - rejected)
    torch.testing.assert_close(aligned_chosen + aligned_rejected, (chosen[0] + rejected[0]).expand(3, 10))
    pw, pl = -torch.rand(10, dtype=torch.float64), -torch.rand(10, dtype=torch.float64)
    plain = mrpo_loss(pw, pl, chosen, rejected, align="none")
    aligned = mrpo_loss(pw, pl, chosen, rejected, align="pair")
    torch.testing.assert_close(plain.alpha, aligned.alpha)
    # A reference 6 nats below the initialising one on every text is clipped without alignment, never with it.
    shifted_c = torch.stack([chosen[0], chosen[0] - 6.0])
    shifted_r = torch.stack([rejected[0], rejected[0] - 6.0])
    assert mrpo_loss(pw, pl, shifted_c, shifted_r, align="none").clip_rate.mean() > 0.5
    assert mrpo_loss(pw, pl, shifted_c, shifted_r, align="pair").clip_rate.max() == 0


def test_pair_statistics_names_and_values():
    chosen, rejected = random_references(3, 6, seed=8)
    pw, pl = -torch.rand(6, dtype=torch.float64) * 40, -torch.rand(6, dtype=torch.float64) * 40
    out = mrpo_loss(pw, pl, chosen, rejected)
    stats = out.pair_statistics()
    expected_names = (
        {
            "rewards/chosen",
            "rewards/rejected",
            "rewards/margins",
            "rewards/accuracies",
            "logps/chosen",
            "logps/rejected",
            "ctro/eps_chosen",
            "ctro/eps_rejected",
            "ctro/clip_rate",
        }
        | {f"{stat}{k}" for k in (1, 2, 3) for stat in ("alpha/ref",)}
        | {f"ref{k}/{stat}" for k in (1, 2, 3) for stat in ("margin", "accuracy")}
    )
    assert set(stats) == expected_names
    assert all(v.shape == (6,) and not v.requires_grad for v in stats.values())
    torch.testing.assert_close(stats["ref2/margin"], chosen[1] - rejected[1])
    torch.testing.assert_close(stats["ref2/accuracy"], (chosen[1] > rejected[1]).double())
    torch.testing.assert_close(stats["rewards/margins"], out.chosen_rewards - out.rejected_rewards)


# ---------------------------------------------------------------------------------------------------------------
# Gradients and dtypes
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("aggregation", ["harmonic", "geometric", "mdpo"])
def test_gradcheck_policy_and_no_gradient_to_references(aggregation):
    chosen, rejected = random_references(3, 4, seed=9)
    chosen.requires_grad_(True)
    rejected.requires_grad_(True)
    pw = (-torch.rand(4, dtype=torch.float64) * 20).requires_grad_(True)
    pl = (-torch.rand(4, dtype=torch.float64) * 20).requires_grad_(True)

    def loss_of_policy(pw, pl):
        return mrpo_loss(pw, pl, chosen, rejected, beta=0.2, aggregation=aggregation).losses

    assert torch.autograd.gradcheck(loss_of_policy, (pw, pl))
    out = mrpo_loss(pw, pl, chosen, rejected, beta=0.2, aggregation=aggregation)
    out.loss.backward()
    assert chosen.grad is None and rejected.grad is None
    assert pw.grad is not None and pw.grad.abs().sum() > 0
    assert not out.alpha.requires_grad and not out.eps_chosen.requires_grad


def test_half_precision_inputs_are_combined_in_float32():
    chosen, rejected = random_references(2, 8, seed=10)
    pw = (-torch.rand(8) * 200).to(torch.bfloat16).requires_grad_(True)
    pl = (-torch.rand(8) * 200).to(torch.bfloat16)
    out = mrpo_loss(pw, pl, chosen.to(torch.bfloat16), rejected.to(torch.bfloat16))
    assert out.losses.dtype == torch.float32 and out.chosen_rewards.dtype == torch.float32
    out.loss.backward()
    assert pw.grad.dtype == torch.bfloat16 and torch.isfinite(pw.grad.float()).all()


# ---------------------------------------------------------------------------------------------------------------
# Extremes (property tests)
# ---------------------------------------------------------------------------------------------------------------

logp = st.floats(min_value=-1e5, max_value=0.0, allow_nan=False, allow_infinity=False)


@settings(max_examples=150, deadline=None)
@given(
    k=st.integers(1, 8),
    b=st.integers(1, 4),
    data=st.data(),
    clip=st.sampled_from(["adaptive", "fixed", "off"]),
    aggregation=st.sampled_from(["harmonic", "geometric", "mdpo"]),
    align=st.sampled_from(["none", "pair"]),
    beta=st.floats(1e-3, 10.0),
    eps=st.floats(0.0, 2.0),
    zero_weights=st.booleans(),
)
def test_extreme_inputs_give_finite_loss_and_gradient(
    k, b, data, clip, aggregation, align, beta, eps, zero_weights
):
    pw = torch.tensor(data.draw(st.lists(logp, min_size=b, max_size=b)), requires_grad=True)
    pl = torch.tensor(data.draw(st.lists(logp, min_size=b, max_size=b)), requires_grad=True)
    chosen = torch.tensor(data.draw(st.lists(st.lists(logp, min_size=b, max_size=b), min_size=k, max_size=k)))
    rejected = torch.tensor(
        data.draw(st.lists(st.lists(logp, min_size=b, max_size=b), min_size=k, max_size=k))
    )
    weights = "adaptive"
    if zero_weights:
        weights = [1.0] + [0.0] * (k - 1) if k > 1 else [1.0]
        weights = weights[::-1] if k > 1 else weights  # a zero weight on the initialising reference too
    out = mrpo_loss(
        pw,
        pl,
        chosen,
        rejected,
        beta=beta,
        weights=weights,
        clip=clip,
        eps=eps,
        aggregation=aggregation,
        align=align,
    )
    out.loss.backward()
    assert torch.isfinite(out.losses).all()
    assert torch.isfinite(pw.grad).all() and torch.isfinite(pl.grad).all()
    assert torch.isfinite(out.chosen_rewards).all() and torch.isfinite(out.rejected_rewards).all()
    torch.testing.assert_close(out.alpha.sum(0).float(), torch.ones(b), atol=1e-5, rtol=0)


def test_references_disagreeing_by_thousands_of_nats():
    pw, pl = t(-50.0, -3e4), t(-60.0, -2.9e4)
    chosen = t(-40.0, -9000.0, -3.1e4, -10.0).reshape(2, 2)
    rejected = t(-8000.0, -45.0, -2.5e4, -9e4).reshape(2, 2)
    for clip in ("adaptive", "off"):
        for aggregation in ("harmonic", "geometric", "mdpo"):
            pw_ = pw.clone().requires_grad_(True)
            out = mrpo_loss(pw_, pl, chosen, rejected, clip=clip, aggregation=aggregation)
            out.loss.backward()
            assert torch.isfinite(out.losses).all() and torch.isfinite(pw_.grad).all()


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


def good_inputs():
    return (
        t(-1.0, -2.0),
        t(-3.0, -4.0),
        -torch.ones(2, 2, dtype=torch.float64),
        -torch.ones(2, 2, dtype=torch.float64),
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: (a[0].reshape(2, 1), *a[1:]), "policy_chosen_logps must have shape (B,)"),
        (lambda a: (a[0], a[1][:1], *a[2:]), "must have the same shape (B,)"),
        (lambda a: (*a[:2], a[2][0], a[3]), "reference_chosen_logps must have shape (K, B)"),
        (lambda a: (*a[:2], a[2][:, :1], a[3]), "reference_chosen_logps must have shape (K, B) = (K, 2)"),
        (lambda a: (*a[:2], a[2][:0], a[3][:0]), "K = 0 references"),
        (lambda a: (*a[:3], a[3][:1]), "must have the same shape (K, B)"),
        (lambda a: (a[0].long(), *a[1:]), "floating point"),
    ],
)
def test_bad_shapes(change, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        mrpo_loss(*change(good_inputs()))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"beta": -0.1}, "beta must be a finite number > 0, got -0.1"),
        ({"beta": 0}, "beta must be a finite number > 0"),
        ({"eps": -0.5}, "eps must be a finite number >= 0, got -0.5"),
        ({"weights": [1, -1]}, r"weights must be finite and non-negative, got \[1.0, -1.0\]"),
        ({"weights": [0, 0]}, "weights must not all be zero"),
        ({"weights": [1, 1, 1]}, "weights has 3 entries but there are K=2 references"),
        ({"weights": "uniform"}, "weights must be 'adaptive'"),
        ({"clip": "sometimes"}, "clip must be 'adaptive', 'fixed' or 'off'"),
        ({"aggregation": "arithmetic"}, "aggregation must be"),
        ({"align": "global"}, "align must be 'none' or 'pair'"),
    ],
)
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mrpo_loss(*good_inputs(), **kwargs)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_name_reference_and_pair(bad):
    pw, pl, chosen, rejected = good_inputs()
    rejected = rejected.clone()
    rejected[1, 1] = bad
    with pytest.raises(
        ValueError, match=r"reference_rejected_logps is not finite for reference 2 .* at pair 1"
    ):
        mrpo_loss(pw, pl, chosen, rejected)
    pw = pw.clone()
    pw[0] = bad
    with pytest.raises(ValueError, match="policy_chosen_logps is not finite for pair 0"):
        mrpo_loss(pw, pl, chosen, rejected)


def test_an_empty_batch_is_an_error_not_a_nan_loss():
    empty = torch.zeros(0)
    with pytest.raises(ValueError, match=r"the batch is empty \(B = 0\)"):
        mrpo_loss(empty, empty, torch.zeros(2, 0), torch.zeros(2, 0))


@pytest.mark.parametrize("tensor", ["policy_chosen_logps", "reference_rejected_logps"])
def test_a_positive_log_prob_is_an_error_naming_the_tensor(tensor):
    values = {
        "policy_chosen_logps": torch.tensor([-1.0, -2.0]),
        "policy_rejected_logps": torch.tensor([-3.0, -4.0]),
        "reference_chosen_logps": torch.tensor([[-1.0, -2.0], [-1.5, -2.5]]),
        "reference_rejected_logps": torch.tensor([[-3.0, -4.0], [-3.5, -4.5]]),
    }
    values[tensor] = values[tensor].clone()
    values[tensor].view(-1)[1] = 0.5
    with pytest.raises(ValueError, match=rf"{tensor} has a positive value 0.5 .* <= 0"):
        mrpo_loss(**values)
    # Zero is a valid log-prob (a certain completion) and so is anything below it.
    values[tensor].view(-1)[1] = 0.0
    assert torch.isfinite(mrpo_loss(**values).loss)


# ---------------------------------------------------------------------------------------------------------------
# §7 Length normalisation (loss.length_normalize)
# ---------------------------------------------------------------------------------------------------------------


def test_length_normalized_k1_is_dpo_on_per_token_log_probs_by_hand():
    pw, pl, rw, rl = t(-12.0, -30.0), t(-40.0, -9.0), t(-10.0, -33.0), t(-44.0, -8.0)
    nw, nl = torch.tensor([4, 10]), torch.tensor([20, 3])
    out = mrpo_loss(pw, pl, rw.unsqueeze(0), rl.unsqueeze(0), beta=2.0, length_normalize=True,
                    chosen_tokens=nw, rejected_tokens=nl)  # fmt: skip
    for i in range(2):
        z = 2.0 * ((pw[i] - rw[i]) / nw[i] - (pl[i] - rl[i]) / nl[i])
        assert out.losses[i].item() == pytest.approx(softplus(-z.item()), rel=1e-12)
        assert out.chosen_rewards[i].item() == pytest.approx(2.0 * (pw[i] - rw[i]).item() / nw[i].item())
    assert out.policy_chosen_logps.tolist() == pytest.approx((pw / nw).tolist())


@pytest.mark.parametrize("clip", ["adaptive", "fixed", "off"])
@pytest.mark.parametrize("aggregation", ["harmonic", "geometric", "mdpo"])
def test_length_normalized_mrpo_is_mrpo_on_every_log_prob_divided_by_the_policy_token_count(
    clip, aggregation
):
    generator = torch.Generator().manual_seed(3)
    chosen_tokens, rejected_tokens = torch.randint(1, 40, (6,)), torch.randint(1, 40, (6,))
    pw, pl = -chosen_tokens * (1 + torch.rand(6, generator=generator)), -rejected_tokens * 1.5
    rc = -chosen_tokens * (0.5 + torch.rand(3, 6, generator=generator, dtype=torch.float64))
    rr = -rejected_tokens * (0.5 + torch.rand(3, 6, generator=generator, dtype=torch.float64))
    pw, pl = pw.double(), pl.double()
    settings = {"beta": 1.5, "clip": clip, "eps": 0.3, "aggregation": aggregation}
    normalized = mrpo_loss(pw, pl, rc, rr, **settings, length_normalize=True, chosen_tokens=chosen_tokens,
                           rejected_tokens=rejected_tokens)  # fmt: skip
    nw, nl = chosen_tokens.double(), rejected_tokens.double()
    by_hand = mrpo_loss(pw / nw, pl / nl, rc / nw, rr / nl, **settings)
    for name in (
        "losses",
        "alpha",
        "eps_chosen",
        "virtual_chosen_logps",
        "clipped_rejected",
        "chosen_rewards",
    ):
        assert torch.equal(getattr(normalized, name), getattr(by_hand, name)) or torch.allclose(
            getattr(normalized, name).double(), getattr(by_hand, name).double(), rtol=1e-12, atol=0
        ), name


def test_a_margin_that_is_only_length_takes_no_weight_once_length_normalized():
    # Reference 1 gives both answers the same -2 nats a token: its sequence margin +40 is the answers' length
    # difference alone (10 vs 30 tokens). Reference 2 prefers the chosen answer by 0.5 nats a token.
    chosen_tokens, rejected_tokens = torch.tensor([10]), torch.tensor([30])
    rc, rr = t(-20.0, -15.0).unsqueeze(1), t(-60.0, -60.0).unsqueeze(1)
    policy = t(-20.0), t(-60.0)
    summed = mrpo_loss(*policy, rc, rr, clip="off")
    assert summed.alpha[:, 0].tolist() == pytest.approx([40 / 85, 45 / 85], rel=1e-6)
    per_token = mrpo_loss(*policy, rc, rr, clip="off", length_normalize=True, chosen_tokens=chosen_tokens,
                          rejected_tokens=rejected_tokens)  # fmt: skip
    assert per_token.reference_margins[:, 0].tolist() == pytest.approx([0.0, 0.5])
    assert per_token.alpha[1, 0].item() == pytest.approx(1.0, abs=1e-5)


def test_length_normalize_refuses_missing_zero_or_misshapen_token_counts():
    pw, pl, rc, rr = t(-3.0, -4.0), t(-5.0, -6.0), t(-3.0, -4.0).unsqueeze(0), t(-5.0, -6.0).unsqueeze(0)
    with pytest.raises(ValueError, match="needs chosen_tokens and rejected_tokens"):
        mrpo_loss(pw, pl, rc, rr, length_normalize=True)
    with pytest.raises(ValueError, match="at least one completion token"):
        mrpo_loss(pw, pl, rc, rr, length_normalize=True, chosen_tokens=torch.tensor([1, 0]),
                  rejected_tokens=torch.tensor([2, 2]))  # fmt: skip
    with pytest.raises(ValueError, match=r"token counts must have shape \(2,\)"):
        mrpo_loss(pw, pl, rc, rr, length_normalize=True, chosen_tokens=torch.tensor([1, 2, 3]),
                  rejected_tokens=torch.tensor([2, 2]))  # fmt: skip
    # Off (the default), token counts are not read.
    assert torch.equal(mrpo_loss(pw, pl, rc, rr).losses, mrpo_loss(pw, pl, rc, rr, chosen_tokens=torch.tensor([0, 0]),
                       rejected_tokens=torch.tensor([0, 0])).losses)  # fmt: skip
