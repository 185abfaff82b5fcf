"""experiments/noisy_study.py and reworded_facts.py: the data's guarantees, the grid, the decision rule and the
report on fake results (no models)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from collections import Counter
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(EXPERIMENTS))
    spec = importlib.util.spec_from_file_location("noisy_study", EXPERIMENTS / "noisy_study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["noisy_study"] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    yield module
    del sys.modules["noisy_study"]
    sys.path.remove(str(EXPERIMENTS))


# ------------------------------------------------------------------------------------------------------------
# Data


def test_facts_have_three_wordings_with_the_same_right_and_wrong_answer(study):
    facts = study.reworded_facts.all_facts()
    assert len({fact.key for fact in facts}) == len(facts)
    for fact in facts:
        assert fact.right != fact.wrong
        pairs = [fact.pair(w) for w in range(3)]
        questions = {p["prompt"][0]["content"] for p in pairs}
        assert len(questions) == 3, fact.key  # three different questions
        for wording, pair in enumerate(pairs):
            # The answers differ only in the fact: one template, the right answer in chosen, the wrong one in rejected.
            answer = fact.templates[wording][1]
            assert pair["chosen"][0]["content"] == answer(fact.right)
            assert pair["rejected"][0]["content"] == answer(fact.wrong)
            assert answer("<x>").count("<x>") == 1, fact.key
        flipped = fact.pair(0, flipped=True)
        assert flipped["chosen"] == pairs[0]["rejected"] and flipped["flipped"] is True


def test_split_is_by_fact_and_stratified(study):
    facts = study.reworded_facts.all_facts()
    pool, disjoint = study.reworded_facts.split_facts(facts)
    assert not {f.key for f in pool} & {f.key for f in disjoint}
    assert len(pool) + len(disjoint) == len(facts)
    kinds = Counter(f.kind for f in facts)
    for kind, n in Counter(f.kind for f in disjoint).items():
        assert n == round(kinds[kind] / 3)


def test_seed_data_flips_thirty_percent_and_rewords_the_same_facts(study, tmp_path):
    settings = study.Settings(seeds=(3,), cells=((0.3, 0.1, "dpo"), (0.0, 0.1, "dpo")), extra_cells=())
    paths = study.seed_data(settings, tmp_path, 3)
    noisy = study.read_jsonl(paths["train-0.3"])
    clean = study.read_jsonl(paths["train-0"])
    assert len(noisy) == len(clean) == 64
    assert sum(r["flipped"] for r in noisy) == round(0.3 * 64) and not any(r["flipped"] for r in clean)
    assert [r["fact"] for r in noisy] == [r["fact"] for r in clean]
    reworded = study.read_jsonl(paths["reworded"])
    assert len(reworded) == 128 and not any(r["flipped"] for r in reworded)
    assert Counter(r["fact"] for r in reworded) == Counter({r["fact"]: 2 for r in noisy})
    assert {r["wording"] for r in reworded} == {1, 2}
    # Deterministic per seed; another seed draws other facts.
    assert study.read_jsonl(study.seed_data(settings, tmp_path / "again", 3)["train-0.3"]) == noisy
    other = study.read_jsonl(study.seed_data(settings, tmp_path / "other", 4)["train-0.3"])
    assert [r["fact"] for r in other] != [r["fact"] for r in noisy]


def test_divergence_pairs_are_long_and_differ_in_length(study, tmp_path):
    records = study.read_jsonl(study.divergence_data(study.Settings(), tmp_path))
    assert len(records) == 32
    for index, record in enumerate(records):
        chosen = record["chosen"][0]["content"].splitlines()
        rejected = record["rejected"][0]["content"].splitlines()
        assert len(chosen) >= 23
        assert len(rejected) == len(chosen) + (4 if index % 2 else -4)


# ------------------------------------------------------------------------------------------------------------
# Grid and decision rule


def test_grid_runs_seed_by_seed_then_extras(study):
    settings = study.Settings(seeds=(0, 1), extra_seeds=(0,), divergence_seeds=(0,), lm_eval=True)
    names = [run.name for run in study.expand_grid(settings)]
    primary = len(settings.cells)
    assert names[0] == "start/s0" and names[1 + primary] == "start/s1"
    assert names[1] == "noise0.3/beta0.1/dpo/s0"
    assert names[-3:] == ["lm_eval/start", "lm_eval/dpo", "lm_eval/mrpo"]
    assert "divergence/ctro_off/s0" in names and len(names) == len(set(names))


def fake_result(
    arm: str, seed: int, reworded: float, disjoint: float, *, noise=0.3, beta=0.1, pairs=64, flipped=19
):
    return {
        "group": "main", "arm": arm, "seed": seed, "noise": noise, "beta": beta, "seconds": 60.0,
        "train": {"last_epoch_loss": 0.5, "clip_rate": 0.5, "pairs": pairs, "flipped": flipped,
                  "first_loss": 0.69, "max_loss": 0.7, "nonfinite_steps": [], "loss_curve": [[1, 0.69]]},
        "eval": {family: {"metrics": {"policy_accuracy": value}, "pairs": 100, "by_kind": {}}
                 for family, value in (("reworded", reworded), ("disjoint", disjoint))},
    }  # fmt: skip


def results_for(study, gains: dict[str, float], noise_scale: float = 0.01):
    results = []
    for seed in range(10):
        wobble = noise_scale * (
            (seed * 7) % 5 - 2
        )  # the same per seed for every arm: paired, as in the study
        base = 0.70 + wobble
        results.append(fake_result("dpo", seed, base, base))
        for arm, gain in gains.items():
            jitter = 0.002 * (seed % 3 - 1)
            results.append(fake_result(arm, seed, base + gain + jitter, base + jitter))
    return results


def test_the_rule_says_helps_when_mrpo_beats_dpo(study):
    cells = study.main_results(results_for(study, {"mrpo": 0.05, "mrpo_no_ctro": 0.0, "dpo_clean": 0.06}))
    assert study.judge(cells, 0.3, 0.1, "reworded").startswith("**MRPO helps** ((b) beat")
    assert "the test discriminates" in study.judge(cells, 0.3, 0.1, "reworded")


def test_the_rule_says_wasted_signal_when_only_filtering_gains(study):
    gains = {"mrpo": 0.005, "mrpo_no_ctro": -0.005, "dpo_external_agrees": 0.04, "dpo_clean": 0.06}
    cells = study.main_results(results_for(study, gains))
    assert study.judge(cells, 0.3, 0.1, "reworded").startswith("**MRPO wastes usable signal**")


def test_the_rule_says_settled_null_when_even_the_oracle_gains_little(study):
    gains = {"mrpo": 0.0, "mrpo_no_ctro": 0.0, "dpo_external_agrees": 0.0, "dpo_clean": 0.01}
    cells = study.main_results(results_for(study, gains))
    verdict = study.judge(cells, 0.3, 0.1, "reworded")
    assert verdict.startswith("**settled null at this scale**")
    # The disjoint family got no gain at all in these fake results: the oracle does not discriminate there.
    assert "does not clearly discriminate" in study.judge(cells, 0.3, 0.1, "disjoint")


def test_paired_difference_removes_the_seed_effect(study):
    results = results_for(study, {"dpo_clean": 0.03}, noise_scale=0.05)  # seeds differ by up to 10 points
    mean, half, n = study.difference(study.main_results(results), (0.3, 0.1, "dpo_clean"), "reworded")
    assert n == 10 and mean == pytest.approx(0.03, abs=1e-3) and half < 0.01


def test_filter_quality_counts_dropped_against_flipped(study):
    results = [fake_result("dpo_external_agrees", seed, 0.7, 0.7, pairs=40, flipped=4) for seed in range(2)]
    text = study.filter_quality(study.main_results(results), 0.3, 0.1, "dpo_external_agrees", 64)
    # Each seed dropped 24 pairs of which 19 - 4 = 15 were flipped: precision 15/24, recall 15/19.
    assert text == "dropped 24.0 pairs per seed; precision 62%, recall 79%"


def test_report_renders_every_section(study, tmp_path):
    results = results_for(
        study, {"mrpo": 0.0, "mrpo_no_ctro": 0.01, "dpo_external_agrees": 0.02, "dpo_clean": 0.04}
    )
    results += [
        {"group": "start", "arm": "start", "seed": 0, "noise": 0.0, "beta": 0.1, "seconds": 30,
         "train": {}, "eval": {"reworded": {"metrics": {"policy_accuracy": 0.75}}, "disjoint": {"metrics": {"policy_accuracy": 0.7}}}},
        {"group": "divergence", "arm": "ctro_off", "seed": 0, "noise": 0.0, "beta": 0.1, "seconds": 40,
         "train": {"first_loss": 40.0, "max_loss": 52.0, "last_epoch_loss": 30.0, "nonfinite_steps": [],
                   "clip_rate": 0.0, "loss_curve": [[1, 40.0], [2, 52.0], [3, 30.0]]}},
        {"group": "lm_eval", "arm": "dpo", "seed": 0, "noise": 0.3, "beta": 0.1, "seconds": 50,
         "lm_eval": {"mrpo_facts": {"acc": 0.5}}, "samples": {"mrpo_facts": 100}},
    ]  # fmt: skip
    plots = study.write_plots(results, tmp_path / "plots", "plots")
    assert set(plots) == {"paired", "divergence"}
    text = study.render_markdown(
        results, study.Settings(), command="cmd", machine="m", runtime_s=60, plots=plots
    )
    assert study.DECISION_RULE in text
    assert "| (e) dpo_clean |" in text and "+4.0 ± " in text
    assert "## Divergence arm" in text and "| ctro_off | 0 | 40.00 | 52.00 |" in text
    assert "mrpo_facts" in text and "Untrained start, reworded: 75.0" in text
    json.dumps(results)  # results stay JSON-serialisable
    assert not math.isnan(study.difference(study.main_results(results), (0.3, 0.1, "mrpo"), "disjoint")[0])
