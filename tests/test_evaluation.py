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


# ----------------------------------------------------------------------------------------------------------------
# Eval pairs that are also training pairs


def _write(path, records):
    import json

    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def _overlap_config(tmp_path, train, eval_path, **data):
    from mrpo.config import MRPOConfig

    return MRPOConfig.from_dict(
        {
            "policy": {"model": str(tmp_path / "no-model-needed")},
            "data": {"train": str(train), "eval": str(eval_path), **data},
            "training": {"output_dir": str(tmp_path / "run")},
            "cache_dir": str(tmp_path / "cache"),
        }
    )


def _records(first, count):
    return [
        {"prompt": f"{i} + 1?", "chosen": str(i + 1), "rejected": str(i)} for i in range(first, first + count)
    ]


@pytest.mark.parametrize(
    ("eval_first", "expected", "message"),
    [
        (
            0,
            8,
            "8 of 8 eval pairs ({eval}) (100%) are also training pairs: held-out metrics on them are not held out",
        ),
        (4, 4, "4 of 8 eval pairs ({eval}) (50%) are also training pairs"),
        (8, 0, None),
    ],
    ids=["a copy", "half", "none"],
)
def test_eval_pairs_that_are_training_pairs_are_counted_and_said(
    tmp_path, caplog, eval_first, expected, message
):
    import logging

    from mrpo.data import load_pairs
    from mrpo.splits import report_overlap

    train = _write(tmp_path / "train.jsonl", _records(0, 8))
    eval_path = _write(tmp_path / "eval.jsonl", _records(eval_first, 8))
    config = _overlap_config(tmp_path, train, eval_path)
    eval_ids = [pair.pair_id for pair in load_pairs(eval_path)]
    train_ids = [pair.pair_id for pair in load_pairs(train)]
    with caplog.at_level(logging.WARNING, logger="mrpo.splits"):
        assert report_overlap(config, eval_ids, train_ids) == expected  # precompute and train: both prepared
        assert report_overlap(config, eval_ids) == expected  # evaluate: the training pairs are read again
    said = [record.getMessage() for record in caplog.records]
    if message is None:
        assert said == []  # no overlap: silent
    else:
        assert len(said) == 2 and all(message.format(eval=eval_path) in line for line in said)


def test_overlap_with_a_subsampled_training_split_counts_only_the_subsample(tmp_path):
    from mrpo.data import load_pairs
    from mrpo.splits import overlap_message, report_overlap

    train = _write(tmp_path / "train.jsonl", _records(0, 200))
    config = _overlap_config(tmp_path, train, train, max_pairs=50)
    eval_ids = [pair.pair_id for pair in load_pairs(train)]
    assert report_overlap(config, eval_ids) == 50
    assert (
        report_overlap(_overlap_config(tmp_path, tmp_path / "gone.jsonl", train), eval_ids) == 0
    )  # unreadable
    assert "(<1%)" in overlap_message(1, 200) and "(>99%)" in overlap_message(199, 200)
    assert "42 of 96 eval pairs (44%) are also training pairs" in overlap_message(42, 96)


def test_precompute_train_and_evaluate_each_say_the_overlap(run_setup, tmp_path, caplog):
    import logging
    import shutil

    from mrpo.config import MRPOConfig
    from mrpo.pipeline import run_evaluate, run_precompute, run_train

    eval_copy = shutil.copy(run_setup["train"], tmp_path / "eval-copy.jsonl")  # a copy: the same pairs
    config = MRPOConfig.from_dict(
        {
            "policy": {"model": str(run_setup["llama"]), "dtype": "float32"},
            "data": {"train": str(run_setup["train"]), "eval": str(eval_copy)},
            "training": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "per_device_train_batch_size": 2,
                         "save_strategy": "no", "report_to": [], "use_cpu": True, "disable_tqdm": True},
            "cache_dir": str(tmp_path / "cache"),
        }
    )  # fmt: skip
    expected = f"4 of 4 eval pairs ({eval_copy}) (100%) are also training pairs"
    for step in (
        lambda: run_precompute(config),
        lambda: run_train(config, show_progress=False),
        lambda: run_evaluate(config, checkpoints={"start": None}, show_progress=False),
    ):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mrpo.splits"):
            step()
        said = [record.getMessage() for record in caplog.records if "eval pairs" in record.getMessage()]
        assert len(said) == 1 and expected in said[0]
