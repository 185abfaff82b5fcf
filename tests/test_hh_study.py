"""experiments/hh_study.py: the split of the HH-RLHF transcripts (no pair in two parts, what is left out and why),
the length statistics of the probe, the held-out gate and the report on fake results (no models)."""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
MODULES = ("hh_study", "teacher_study", "teacher_report", "noisy_study", "truthfulqa_students")


@pytest.fixture(scope="module")
def hh():
    sys.path.insert(0, str(EXPERIMENTS))
    spec = importlib.util.spec_from_file_location("hh_study", EXPERIMENTS / "hh_study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["hh_study"] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    yield module
    for name in MODULES:
        sys.modules.pop(name, None)
    sys.path.remove(str(EXPERIMENTS))


def _transcript(question: str, answer: str) -> str:
    return f"\n\nHuman: {question}\n\nAssistant: {answer}"


def _rows() -> list[dict]:
    rows = []
    for index in range(120):
        question = f"Question number {index}?"
        short, long = f"No {index}.", f"A longer answer, number {index}, with more words in it."
        chosen, rejected = (short, long) if index % 3 else (long, short)
        rows.append({"chosen": _transcript(question, chosen), "rejected": _transcript(question, rejected)})
    rows[5]["chosen"] = _transcript("Too long?", "x" * 400)  # over max_chars
    rows[7]["rejected"] = rows[7]["chosen"]  # the same final answer
    rows[9]["chosen"] = _transcript("Question number 9?", "")  # an empty final answer: the reader refuses it
    rows[11]["rejected"] = _transcript("Another question?", "No 11.")  # turns that differ before the last
    return rows


def _write(path: Path, rows: list[dict]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    return path


def test_split_keeps_every_part_apart_and_counts_what_it_leaves_out(hh, tmp_path):
    settings = hh.HHSettings(
        seeds=(0, 1, 2), heldout_pairs=40, teacher_pairs=30, train_pairs=16, max_chars=300
    )
    source = _write(tmp_path / "hh.jsonl.gz", _rows())
    counts = hh.write_hh_data(settings, source, tmp_path / "data")
    assert counts == {
        "rows": 120,
        "left_out": {
            "refused by the reader: empty completion": 1,
            "refused by the reader: transcripts diverge before the last turn": 1,
            "same_answer": 1,
            "too_long": 1,
        },
        "heldout": 40,
        "teacher": 30,
        "pool": 46,
    }

    def indices(name: str) -> list[int]:
        lines = (tmp_path / "data" / name).read_text(encoding="utf-8").splitlines()
        return [json.loads(line)["hh_index"] for line in lines]

    heldout, teacher = indices("heldout.jsonl"), indices("teacher-train.jsonl")
    trains = [indices(f"s{seed}/train.jsonl") for seed in (0, 1, 2)]
    assert len(set(heldout)) == 40 and len(set(teacher)) == 30
    assert not set(heldout) & set(teacher) and {5, 7, 9, 11}.isdisjoint(
        {*heldout, *teacher, *sum(trains, [])}
    )
    for train in trains:
        assert len(set(train)) == 16 and not set(train) & (set(heldout) | set(teacher))
    assert trains[0] != trains[1]  # each seed its own draw
    # Deterministic: the same split and draws again.
    hh.write_hh_data(settings, source, tmp_path / "again")
    assert (tmp_path / "again" / "s1" / "train.jsonl").read_bytes() == (
        tmp_path / "data" / "s1" / "train.jsonl"
    ).read_bytes()
    record = json.loads((tmp_path / "data" / "heldout.jsonl").read_text(encoding="utf-8").splitlines()[0])
    row = _rows()[record["hh_index"]]
    assert record["chosen"] == row["chosen"] and record["chosen_longer"] == (record["hh_index"] % 3 == 0)


def test_split_refuses_a_pool_too_small_for_the_students(hh, tmp_path):
    settings = hh.HHSettings(heldout_pairs=60, teacher_pairs=50, train_pairs=16, max_chars=300)
    with pytest.raises(SystemExit, match="leave 6 for the student pool; 16 needed"):
        hh.split_pairs(_rows(), settings)


def test_length_tracking(hh):
    # Margins that favour the shorter answer, exactly proportional to the length difference.
    tracked = hh.length_tracking([-2.0, -4.0, 1.0, 3.0], [2.0, 4.0, -1.0, -3.0])
    assert tracked["correlation"] == pytest.approx(-1.0) and tracked["shorter_wins"] == 1.0
    # Pairs of equal length are left out of the share; a constant margin has no correlation.
    tracked = hh.length_tracking([1.0, 1.0, 1.0], [5.0, 0.0, -5.0])
    assert math.isnan(tracked["correlation"]) and tracked["shorter_wins"] == 0.5


def _result(arm: str, seed: int, accuracy: float, per_token: float | None = None) -> dict:
    per_token = accuracy if per_token is None else per_token
    by_token = {
        "policy_accuracy": per_token,
        "by_group": {
            "chosen_longer": {"policy_accuracy": per_token - 0.02, "pairs": 200},
            "chosen_shorter": {"policy_accuracy": per_token + 0.02, "pairs": 300},
        },
    }
    family = {
        "policy_accuracy": accuracy,
        "by_group": {
            "chosen_longer": {"policy_accuracy": accuracy - 0.1, "pairs": 200},
            "chosen_shorter": {"policy_accuracy": accuracy + 0.1, "pairs": 300},
        },
        "paper_metric_step0": {"reward_accuracy_own_virtual": 0.3, "reward_accuracy_start": 0.0},
        "paper_metric_trained": {"reward_accuracy_own_virtual": 0.6, "reward_accuracy_start": 0.6},
        "chosen_longer": 0.44,
    }
    train = {"last_epoch_loss": 0.5, "clip_rate": 0.9}
    evaluation = {"heldout": family, "heldout_per_token": by_token}
    return {"group": "main", "arm": arm, "seed": seed, "train": train, "eval": evaluation}


def _probe(low: float, per_token_low: float = -0.02) -> dict:
    start = {
        "all": {"agreement": 0.54, "mean_abs_margin": 9.0},
        "length": {"correlation": -0.9, "shorter_wins": 0.9},
        "per_token": {
            "agreement": 0.55,
            "mean_abs_margin": 0.3,
            "length": {"correlation": -0.2, "shorter_wins": 0.6},
        },
    }
    teacher = {
        "all": {"agreement": 0.62, "mean_abs_margin": 12.0, "beyond_start": 0.4, "less_confident": 0.3,
                "vs_start": {"difference": 0.08, "low": low, "high": 0.13}},
        "length": {"correlation": -0.5, "shorter_wins": 0.7},
        "per_token": {"agreement": 0.57, "mean_abs_margin": 0.4, "beyond_start": 0.3, "less_confident": 0.4,
                      "vs_start": {"difference": 0.02, "low": per_token_low, "high": 0.06},
                      "length": {"correlation": -0.1, "shorter_wins": 0.55}},
    }  # fmt: skip
    return {"group": "probe", "arm": "probe", "seed": 0, "heldout": {"init": start, "t1": teacher}}


def test_report_on_fake_results_judges_on_the_heldout_pairs(hh, tmp_path):
    settings = hh.HHSettings(seeds=(0, 1, 2))
    levels = {"dpo": 0.55, "mrpo_t1": 0.55, "noctro_t1": 0.60, "dpo_ref_t1": 0.60, "mrpo_random": 0.55,
              "noctro_random": 0.55}  # fmt: skip
    results = [_result(arm, seed, level + 0.01 * seed) for arm, level in levels.items() for seed in range(3)]
    # Per token: DPO 0.50; with t1 alone 0.56 on every seed; MRPO without CTRO with it +2 only (under 3 points).
    per_token = {"dpo_ln": 0.50, "noctro_t1_ln": 0.52, "dpo_ref_t1_ln": 0.56, "noctro_random_ln": 0.50}
    results += [
        _result(arm, seed, 0.55, level + 0.01 * seed) for arm, level in per_token.items() for seed in range(3)
    ]
    teacher = {"group": "teacher", "arm": "t1", "seed": 0, "base": "init", "pairs": 800, "seconds_train": 600.0,
               "train": {"last_epoch_loss": 0.6}}  # fmt: skip
    split = {
        "rows": 2312,
        "left_out": {"too_long": 393, "same_answer": 2},
        "heldout": 500,
        "teacher": 800,
        "pool": 617,
    }
    docs = tmp_path / "docs" / "results-hh-study.md"
    docs.parent.mkdir()
    hh.write_report([teacher, _probe(0.03, 0.01), *results], settings, split, [], docs, machine="test")
    text = docs.read_text(encoding="utf-8")
    # noctro_t1 beats DPO by 5 points on every seed and beats its random control: the first branch of the rule.
    assert (
        "sums (the paper's loss), judged on held-out accuracy: **t1: a teacher helps through MRPO** ((c) noctro_t1)"
        in text
    )
    assert (
        "per token (length-normalised), judged on per-token accuracy: **t1: only a better single reference"
        in text
    )
    assert (
        "| (c) noctro_t1_ln | MRPO without CTRO per token, t1 | 55.0 ± 0.0 | +0.0 ± 0.0 (3) | 53.0 ± 2.5 | +2.0 ± 0.0 (3) |"
        in text
    )
    assert "beats the start on the held-out pairs and per token on the held-out pairs." in text
    assert "| t1 (SmolLM2 taught on HH) | 62.0% | +8.0 [+3.0, +13.0] |" in text
    assert "-0.50 | 70% |" in text  # the teacher's length tracking
    assert "left out: 393 longer than 1200 characters (either transcript), 2 whose final answers" in text
    assert "617 in the student pool" in text
    # By answer length: DPO's accuracy, then the paired differences.
    assert (
        "| (a) dpo | 46.0 ± 2.5 | 66.0 ± 2.5 |" in text
        and "| (c) noctro_t1 | +5.0 ± 0.0 | +5.0 ± 0.0 |" in text
    )
    assert "the start on the held-out pairs does not beat" not in text and "teacher-known" not in text
    summary = json.loads((docs.parent / "hh-study" / "summary.json").read_text(encoding="utf-8"))
    assert summary["split"] == split and len(summary["results"]) == 2 + len(results)
    assert (docs.parent / "hh-study" / "paired.png").exists()
    # A teacher that does not beat the start on the held-out pairs is not judged.
    hh.write_report([teacher, _probe(-0.01), *results], settings, split, [], docs, machine="test")
    text = docs.read_text(encoding="utf-8")
    assert "**t1: not judged** (it does not beat the start on the held-out pairs)" in text
    assert "**t1: not judged** (it does not beat the start per token on the held-out pairs)" in text
    assert "does NOT beat the start, neither on the sequence margins nor per token" in text
    # As the study ran: the sequence gate passed, the per-token one did not, so no length-normalised arm ran.
    sums_only = [r for r in results if not r["arm"].endswith("_ln")]
    hh.write_report([teacher, _probe(0.03, -0.01), *sums_only], settings, split, [], docs, machine="test")
    text = docs.read_text(encoding="utf-8")
    assert (
        "per-token accuracy: **t1: not judged** (it does not beat the start per token on the held-out" in text
    )
    assert "beats the start on the held-out pairs." in text


def test_students_run_only_for_a_teacher_the_gate_lets_through(hh):
    settings = hh.HHSettings(seeds=(0, 1))
    runs = hh.expand_grid(settings)
    said = []
    assert hh.students_of_used_teachers(runs, _probe(0.03, 0.01), settings, said.append) == runs and not said
    # Neither gate passes: teacher and probe stay (finished), no student and no start evaluation runs.
    kept = hh.students_of_used_teachers(runs, _probe(-0.01, -0.01), settings, said.append)
    assert [run.group for run in kept] == ["teacher", "probe"]
    assert said == [
        "t1 does not beat the start on the held-out pairs: its student runs are not run",
        "t1 does not beat the start per token on the held-out pairs: its student runs are not run",
    ]
    # Only the per-token gate passes: the length-normalised arms (and the start's evaluation) run, seed by seed.
    kept = hh.students_of_used_teachers(runs, _probe(-0.01, 0.01), settings, said.append)
    assert [(run.arm, run.seed) for run in kept if run.group != "teacher"][:7] == [
        ("probe", 0), ("start", 0), ("dpo_ln", 0), ("noctro_t1_ln", 0), ("dpo_ref_t1_ln", 0),
        ("noctro_random_ln", 0), ("start", 1),
    ]  # fmt: skip
    # With a second teacher that passes, only the refused teacher's own arms go.
    two = hh.HHSettings(seeds=(0,), teachers=("t1", "t2"), arms=("dpo", "mrpo_t1", "mrpo_t2", "mrpo_random"))
    probe = _probe(-0.01)
    probe["heldout"]["t2"] = _probe(0.03)["heldout"]["t1"]
    kept = hh.students_of_used_teachers(hh.expand_grid(two), probe, two, said.append)
    assert [run.arm for run in kept if run.group == "main"] == ["dpo", "mrpo_t2", "mrpo_random"]


def test_the_probe_reads_each_model_per_policy_token(hh):
    from types import SimpleNamespace

    import torch

    from mrpo.data.pairs import PreferencePair
    from mrpo.data.token_store import TokenizedPair, TokenizedSequence

    # Two pairs: chosen answers of 2 and 8 policy tokens, rejected of 4 and 2 (prompts of 3 tokens).
    lengths = [(2, 4), (8, 2)]
    tokenized = [
        TokenizedPair(str(i), TokenizedSequence((0,) * (3 + w), 3), TokenizedSequence((0,) * (3 + r), 3))
        for i, (w, r) in enumerate(lengths)
    ]
    texts = [PreferencePair(str(i), "q", "a" * w, "b" * r) for i, (w, r) in enumerate(lengths)]
    # The start is -1 nat a token on every answer: its sequence margins (+2, -6) are length alone, per token 0.
    # The teacher: chosen -0.5 a token, rejected -1: per token +0.5 on both pairs, as sums +3 and -2.
    chosen = torch.tensor([[-2.0, -8.0], [-1.0, -4.0]])
    rejected = torch.tensor([[-4.0, -2.0], [-4.0, -2.0]])
    prepared = SimpleNamespace(
        dataset=SimpleNamespace(
            pairs=tokenized, reference_chosen_logps=chosen, reference_rejected_logps=rejected
        ),
        tokenization=SimpleNamespace(pair_ids=["0", "1"]),
        text_pairs=lambda: texts,
    )
    chosen_tokens, rejected_tokens = hh.policy_token_counts(prepared)
    assert chosen_tokens.tolist() == [2.0, 8.0] and rejected_tokens.tolist() == [4.0, 2.0]
    extras = hh.HHRunner.probe_extras(None, prepared, ["init", "t1"], chosen - rejected)
    assert extras["init"]["length"] == {
        "correlation": pytest.approx(-1.0),
        "shorter_wins": 1.0,
    }  # sums: length
    assert extras["init"]["per_token"]["mean_abs_margin"] == pytest.approx(0.0)
    assert extras["t1"]["per_token"]["agreement"] == 1.0 and extras["t1"]["per_token"]["mean_margin"] == 0.5
    assert extras["t1"]["per_token"]["vs_start"]["difference"] == 1.0  # the start's 0 margins do not agree
