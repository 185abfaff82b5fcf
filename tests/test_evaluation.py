"""Held-out metrics on hand-made log-probs with known answers, the label-aware flag, the rates' intervals, the
paired difference between trained models, and `mrpo evaluate` end to end on tiny models."""

import json
import math

import pytest
import torch

from mrpo.audit_stats import wilson_interval
from mrpo.config.schema import LossConfig
from mrpo.evaluation import (
    HeldOutMetrics,
    add_paired_differences,
    compute_metrics,
    different_pair_counts,
    format_table,
    is_label_aware,
    paired_difference,
    rate_intervals,
)
from tiny_models import bpe_tokenizer, save_model_dir, tiny_llama

KEYS = (
    "policy_accuracy", "policy_accuracy_per_token", "reward_accuracy_initialising", "reward_accuracy_virtual",
    "policy_margin", "reward_margin_initialising", "reward_margin_virtual", "clip_rate",
)  # fmt: skip


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def _four_pairs():
    """Four hand-made pairs, K = 2: policy chosen / rejected, their token counts, the references' columns."""
    return (
        t(-10.0, -20.0, -5.0, -8.0),
        t(-12.0, -15.0, -6.0, -8.5),
        torch.tensor([5, 10, 2, 4]),
        torch.tensor([4, 5, 6, 4]),
        torch.stack([t(-11.0, -19.0, -4.0, -9.0), t(-10.0, -20.0, -5.0, -8.0)]),
        torch.stack([t(-12.0, -16.0, -6.0, -9.0), t(-14.0, -14.0, -6.0, -8.0)]),
    )


def test_metrics_on_hand_made_log_probs():
    # Four pairs, K = 2, beta = 0.5, fixed weights, no clipping (so the virtual reference is easy to write out).
    policy_chosen, policy_rejected, chosen_tokens, rejected_tokens, reference_chosen, reference_rejected = (
        _four_pairs()
    )
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


def test_length_normalized_metrics_are_the_loss_view_per_policy_token():
    # The same four pairs read per token: policy -2, -2, -2.5, -2 (chosen) vs -3, -3, -1, -2.125 (rejected).
    policy_chosen, policy_rejected, chosen_tokens, rejected_tokens, reference_chosen, reference_rejected = (
        _four_pairs()
    )
    loss = LossConfig(beta=2.0, weights=[1.0, 1.0], clip="off", length_normalize=True)
    metrics = compute_metrics(
        policy_chosen,
        policy_rejected,
        chosen_tokens,
        rejected_tokens,
        reference_chosen,
        reference_rejected,
        loss,
    )
    # Against the start, per token: 2 * ((pw - l1w)/nw - (pl - l1l)/nl):
    #   2 * (0.2 - 0) = 0.4; 2 * (-0.1 - 0.2) = -0.6; 2 * (-0.5 - 0) = -1; 2 * (0.25 - 0.125) = 0.25
    assert metrics["reward_accuracy_initialising"] == 0.5
    assert metrics["reward_margin_initialising"] == pytest.approx((0.4 - 0.6 - 1 + 0.25) / 4)
    # The policy's own accuracy stays a property of the model (sums), beside its per-token reading.
    assert metrics["policy_accuracy"] == 0.75 and metrics["policy_accuracy_per_token"] == 0.75

    def log_r(a, b):
        return -math.log(0.5 * math.exp(-a) + 0.5 * math.exp(-b))

    margins = []
    for i in range(4):
        nw, nl = chosen_tokens[i].item(), rejected_tokens[i].item()
        r_w = log_r(reference_chosen[0, i].item() / nw, reference_chosen[1, i].item() / nw)
        r_l = log_r(reference_rejected[0, i].item() / nl, reference_rejected[1, i].item() / nl)
        margins.append(2.0 * ((policy_chosen[i].item() / nw - r_w) - (policy_rejected[i].item() / nl - r_l)))
    assert metrics["reward_margin_virtual"] == pytest.approx(sum(margins) / 4)


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


def test_rates_get_wilson_intervals_and_the_clip_rate_none():
    metrics = {**dict.fromkeys(KEYS, 0.25), "policy_accuracy": 0.75, "policy_margin": 0.1}
    intervals = rate_intervals(metrics, 40)
    assert intervals["policy_accuracy"] == list(wilson_interval(30, 40))
    assert intervals["reward_accuracy_virtual"] == list(wilson_interval(10, 40))
    assert set(intervals) == {"policy_accuracy", "policy_accuracy_per_token", "reward_accuracy_initialising",
                              "reward_accuracy_virtual"}  # fmt: skip
    low, high = wilson_interval(30, 40)
    table = format_table([HeldOutMetrics("run", "m", 40, metrics, False, intervals=intervals)])
    assert f"75.0% [{low * 100:.1f}, {high * 100:.1f}]" in table and "95% Wilson interval" in table
    clip_line = next(line for line in table.splitlines() if line.startswith("CTRO clip rate"))
    assert "[" not in clip_line


def test_paired_difference_is_the_mean_per_pair_difference_with_a_normal_interval():
    model = torch.tensor([True, True, False, True, False, True])
    baseline = torch.tensor([True, False, False, True, True, False])
    paired = paired_difference(model, baseline, "dpo")
    # per pair: 0, +1, 0, 0, -1, +1 -> mean 1/6; sample sd over 6 pairs
    differences = [0, 1, 0, 0, -1, 1]
    mean = sum(differences) / 6
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / 5)
    assert paired["difference"] == pytest.approx(mean)
    assert paired["low"] == pytest.approx(mean - 1.959964 * sd / math.sqrt(6), abs=1e-6)
    assert paired["high"] == pytest.approx(mean + 1.959964 * sd / math.sqrt(6), abs=1e-6)
    assert (paired["better"], paired["worse"], paired["pairs"], paired["baseline"]) == (2, 1, 6, "dpo")


def test_trained_models_are_paired_against_dpo_and_the_table_says_what_it_means():
    results = [
        HeldOutMetrics(label, "m", 4, dict.fromkeys(KEYS, 0.5), False) for label in ("start", "mrpo", "dpo")
    ]
    correct = {
        "start": torch.tensor([False, False, True, False]),
        "mrpo": torch.tensor([True, True, True, True]),
        "dpo": torch.tensor([True, False, True, False]),
    }
    assert add_paired_differences(results, correct, ["mrpo", "dpo"]) == "dpo"  # "dpo" wins over the first
    start, mrpo, dpo = results
    assert start.paired is None and dpo.paired is None
    assert mrpo.paired["difference"] == pytest.approx(0.5) and mrpo.paired["better"] == 2
    table = format_table(results)
    row = next(line for line in table.splitlines() if line.startswith("Δ policy pref. acc. vs dpo (pts)"))
    assert row.split()[-1] == "baseline" and "+50.0 [" in row
    assert (
        "Δ mrpo − dpo: +50.0 [" in table and "points over 4 shared pairs" in table and "1.96·sd/√n" in table
    )
    # No "dpo": the first trained model; a single trained model has nothing to pair with.
    assert add_paired_differences(results[:2], correct, ["mrpo"]) is None
    with pytest.raises(Exception, match="baseline 'sft' is not among the evaluated models"):
        add_paired_differences(results, correct, ["mrpo", "dpo"], baseline="sft")


def test_different_training_pair_counts_are_said_with_the_drops_that_explain_them():
    counts = [
        ("dpo", 178, {"longer than 512 tokens for policy": 3}),
        ("mrpo", 176, {"longer than 512 tokens for policy": 3, "longer than 512 tokens for ref3": 2}),
        ("start", None, {}),
    ]
    assert different_pair_counts(counts) == (
        "mrpo trained on 176 pairs, dpo on 178: mrpo has 2 fewer (longer than 512 tokens for ref3: 2)"
    )
    assert different_pair_counts([("a", 10, {}), ("b", 10, {})]) is None
    results = [
        HeldOutMetrics(label, "m", 4, dict.fromkeys(KEYS, 0.5), False, trained_pairs=n, trained_drops=drops)
        for label, n, drops in counts
    ]
    table = format_table(results)
    assert "trained on (pairs)" in table and "Not the same training data: mrpo trained on 176 pairs" in table


def test_evaluate_several_checkpoints_writes_intervals_the_paired_difference_and_pair_counts(
    run_setup, capsys
):
    from mrpo.config.schema import load_config
    from mrpo.pipeline import run_evaluate

    root = run_setup["root"] / "evaluate-paired"
    checkpoints = {}
    for label, seed, used in (("dpo", 1, 4), ("mrpo", 2, 3)):
        save_model_dir(tiny_llama(seed=seed), bpe_tokenizer(), root / label / "final")
        summary = {
            "train": {
                "pairs_used": used,
                "dropped_by_tokenization": {"longer than 9 tokens for gemma": 4 - used},
            }
        }
        (root / label / "data_summary.json").write_text(json.dumps(summary))
        checkpoints[label] = str(root / label / "final")
    config_path = root / "config.yaml"
    config_path.write_text(
        json.dumps(
            {
                "policy": {"model": str(run_setup["llama"]), "dtype": "float32"},
                "references": [
                    {"name": "init", "model": str(run_setup["llama"]), "dtype": "float32"},
                    {"name": "gemma", "model": str(run_setup["gemma"]), "dtype": "float32"},
                ],
                "data": {"train": str(run_setup["train"]), "eval": str(run_setup["train"])},
                "training": {"output_dir": str(root / "out")},
                "cache_dir": str(root / "cache"),
            }
        )
    )
    config = load_config(config_path)
    results, output = run_evaluate(config, checkpoints={"start": None, **checkpoints}, show_progress=False)
    written = {model["label"]: model for model in json.loads(output.read_text())["models"]}
    assert written["start"]["paired"] is None and written["dpo"]["paired"] is None
    paired = written["mrpo"]["paired"]
    assert paired["baseline"] == "dpo" and paired["pairs"] == 4 and "1.96" in paired["method"]
    assert paired["difference"] == pytest.approx(written["mrpo"]["metrics"]["policy_accuracy"]
                                                 - written["dpo"]["metrics"]["policy_accuracy"])  # fmt: skip
    low, high = written["dpo"]["intervals"]["policy_accuracy"]
    assert low <= written["dpo"]["metrics"]["policy_accuracy"] <= high
    assert (written["dpo"]["trained_pairs"], written["mrpo"]["trained_pairs"]) == (4, 3)
    table = format_table(results)
    assert "mrpo trained on 3 pairs, dpo on 4: mrpo has 1 fewer (longer than 9 tokens for gemma: 1)" in table


def _tiny_run_config(run_setup, root, **training) -> dict:
    return {
        "policy": {"model": str(run_setup["llama"]), "dtype": "float32"},
        "references": [
            {"name": "init", "model": str(run_setup["llama"]), "dtype": "float32"},
            {"name": "gemma", "model": str(run_setup["gemma"]), "dtype": "float32"},
        ],
        "data": {"train": str(run_setup["train"]), "eval": str(run_setup["train"])},
        "training": {"output_dir": str(root / "out"), "use_cpu": True, **training},
        "cache_dir": str(root / "cache"),
    }


def test_training_announces_labels_and_prints_its_held_out_evaluation(run_setup, capsys):
    from mrpo.cli import main

    root = run_setup["root"] / "train-evaluation"
    root.mkdir()
    training = {
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "save_strategy": "no",
        "disable_tqdm": False,
    }
    config = _tiny_run_config(run_setup, root, **training)
    config["data"]["max_eval_pairs"] = 3
    (root / "config.yaml").write_text(json.dumps(config))
    assert main(["train", str(root / "config.yaml")]) == 0
    captured = capsys.readouterr()
    # Before evaluating: how many pairs, and what caps them; the bar names the split, the model and the pairs.
    assert (
        f"evaluating the trained policy (step 2) on 3 held-out pairs of {run_setup['train']} " in captured.err
    )
    assert "(data.max_eval_pairs = 3 caps it)" in captured.err
    assert "held-out eval split: 3 pairs, policy at step 2" in captured.err
    # After: the figures it computed, in the run's terms, and how to get the comparable ones.
    summary = next(
        line for line in captured.out.splitlines() if line.startswith("held-out (3 pairs, step 2): ")
    )
    lines = [json.loads(line) for line in (root / "out" / "metrics.jsonl").read_text().splitlines()]
    logged = [line for line in lines if "eval_loss" in line][-1]
    assert (
        f"loss {logged['eval_loss']:.4f}" in summary
        and "reward accuracy" in summary
        and "CTRO clip rate" in summary
    )
    assert f"mrpo evaluate {root / 'out' / 'mrpo_config.yaml'}" in captured.out


def test_each_pair_keeps_its_own_rows_kind_when_two_rows_share_their_texts():
    from collections import Counter

    from mrpo.data.sources import pairs_from_records
    from mrpo.data.tokenization import ModelView, tokenize_for_models
    from mrpo.evaluation import split_kinds
    from mrpo.prepared_split import PreparedSplit
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
    from mrpo.config.schema import MRPOConfig

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

    from mrpo.data.sources import load_pairs
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
    from mrpo.data.sources import load_pairs
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

    from mrpo.config.schema import MRPOConfig
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
