"""Held-out metrics on hand-made log-probs with known answers, and the label-aware flag."""

import math

import pytest
import torch

from mrpo.config import LossConfig
from mrpo.evaluation import HeldOutMetrics, compute_metrics, format_table, is_label_aware


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_metrics_on_hand_made_log_probs():
    # Four pairs, K = 2, beta = 0.5, fixed weights, no clipping (so the virtual reference is easy to write out).
    policy_chosen = t(-10.0, -20.0, -5.0, -8.0)
    policy_rejected = t(-12.0, -15.0, -6.0, -8.5)
    chosen_tokens = torch.tensor([5, 10, 2, 4])
    rejected_tokens = torch.tensor([4, 5, 6, 4])
    reference_chosen = torch.stack([t(-11.0, -19.0, -4.0, -9.0), t(-10.0, -20.0, -5.0, -8.0)])
    reference_rejected = torch.stack([t(-12.0, -16.0, -6.0, -9.0), t(-14.0, -14.0, -6.0, -8.0)])
    loss = LossConfig(beta=0.5, weights=[1.0, 1.0], clip="off")
    metrics = compute_metrics(
        policy_chosen,
        policy_rejected,
        chosen_tokens,
        rejected_tokens,
        reference_chosen,
        reference_rejected,
        loss,
    )
    # policy margins pw - pl: 2, -5, 1, 0.5 -> 3 of 4 prefer the chosen answer; mean (2 - 5 + 1 + 0.5) / 4
    assert metrics["policy_accuracy"] == 0.75
    assert metrics["policy_margin"] == pytest.approx(-0.375)
    # per token: -2 vs -3 (yes), -2 vs -3 (yes), -2.5 vs -1 (no), -2 vs -2.125 (yes)
    assert metrics["policy_accuracy_per_token"] == 0.75
    # against the initialising reference: beta * ((pw - l1w) - (pl - l1l)):
    #   0.5 * ((1) - (0)) = 0.5; 0.5 * ((-1) - (1)) = -1; 0.5 * ((-1) - (0)) = -0.5; 0.5 * ((1) - (0.5)) = 0.25
    assert metrics["reward_accuracy_initialising"] == 0.5
    assert metrics["reward_margin_initialising"] == pytest.approx((0.5 - 1 - 0.5 + 0.25) / 4)

    # against the virtual reference: log r = -log(0.5 exp(-l1) + 0.5 exp(-l2)) for chosen and rejected
    def log_r(a, b):
        return -math.log(0.5 * math.exp(-a) + 0.5 * math.exp(-b))

    margins = []
    for i in range(4):
        r_w = log_r(reference_chosen[0, i].item(), reference_chosen[1, i].item())
        r_l = log_r(reference_rejected[0, i].item(), reference_rejected[1, i].item())
        margins.append(0.5 * ((policy_chosen[i].item() - r_w) - (policy_rejected[i].item() - r_l)))
    assert metrics["reward_margin_virtual"] == pytest.approx(sum(margins) / 4)
    assert metrics["reward_accuracy_virtual"] == pytest.approx(sum(m > 0 for m in margins) / 4)
    assert metrics["clip_rate"] == 0.0


def test_label_aware_flag_and_table_marker():
    assert is_label_aware(LossConfig(clip="adaptive"), 2)
    assert not is_label_aware(LossConfig(clip="adaptive"), 1)  # one reference: nothing is clipped
    assert not is_label_aware(LossConfig(clip="fixed"), 3)  # the same band for both answers: no label used
    assert not is_label_aware(LossConfig(clip="off"), 3)
    keys = (
        "policy_accuracy", "policy_accuracy_per_token", "reward_accuracy_initialising", "reward_accuracy_virtual",
        "policy_margin", "reward_margin_initialising", "reward_margin_virtual", "clip_rate",
    )  # fmt: skip
    results = [
        HeldOutMetrics("dpo", "m", 4, dict.fromkeys(keys, 0.5), label_aware=False),
        HeldOutMetrics("mrpo", "m", 4, dict.fromkeys(keys, 0.5), label_aware=True),
    ]
    table = format_table(results)
    assert "50.0%*" in table and "label-aware" in table
    dpo_only = format_table(results[:1])
    assert "*" not in dpo_only


def test_adaptive_clip_makes_the_start_look_better_than_it_is():
    # The untrained start has pw = l_1 exactly, so against the initialising reference it has no preference at all;
    # against a label-aware virtual reference it can score: the reason the flag exists.
    generator = torch.Generator().manual_seed(0)
    initialising_chosen = -torch.rand(200, generator=generator, dtype=torch.float64) * 30 - 5
    initialising_rejected = -torch.rand(200, generator=generator, dtype=torch.float64) * 30 - 5
    external_chosen = initialising_chosen - 6.0  # another family: ~6 nats lower on every text
    external_rejected = initialising_rejected - 6.0
    metrics = compute_metrics(
        initialising_chosen,
        initialising_rejected,
        torch.full((200,), 10),
        torch.full((200,), 10),
        torch.stack([initialising_chosen, external_chosen]),
        torch.stack([initialising_rejected, external_rejected]),
        LossConfig(),
    )
    assert metrics["reward_accuracy_initialising"] == 0.0
    assert metrics["reward_margin_initialising"] == 0.0
    assert metrics["clip_rate"] > 0.9
    assert metrics["reward_accuracy_virtual"] > 0.0  # the label leaks through the adaptive eps split


def test_each_pair_keeps_its_own_rows_kind_when_two_rows_share_their_texts():
    from collections import Counter

    from mrpo.data import pairs_from_records
    from mrpo.evaluation import split_kinds
    from mrpo.pipeline import PreparedSplit
    from mrpo.tokenization import ModelView, tokenize_for_models
    from tiny_models import char_tokenizer

    records = [{"prompt": f"Q{i}?", "chosen": "yes", "rejected": "no", "kind": "a"} for i in range(11)]
    records += [{"prompt": f"R{i}?", "chosen": "yes", "rejected": "no", "kind": "b"} for i in range(12)]
    shared = {"prompt": "Same?", "chosen": "yes", "rejected": "no"}
    records.insert(3, {**shared, "kind": "a"})
    records.insert(5, {"prompt": "Long? " * 40, "chosen": "yes", "rejected": "no", "kind": "a"})  # dropped
    records.append({**shared, "kind": "b"})
    pairs = pairs_from_records(records)
    assert pairs.duplicates == 1
    tokenization = tokenize_for_models(pairs, [ModelView(char_tokenizer())], max_length=64)
    assert len(tokenization.pair_ids) == 25 and sum(tokenization.dropped.values()) == 1
    prepared = PreparedSplit(
        pairs.counts(), tokenization, None, None, None, "eval", pairs
    )  # what split_kinds reads
    kinds = split_kinds(prepared)
    assert Counter(kinds) == {"a": 12, "b": 13}
    kept_rows = [record for record in records if not record["prompt"].startswith("Long?")]
    assert kinds == [record["kind"] for record in kept_rows]
