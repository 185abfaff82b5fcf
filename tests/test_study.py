"""experiments/study.py: grid expansion, resume, aggregation maths and the report, on fake runs (no models)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

STUDY_PATH = Path(__file__).resolve().parents[1] / "experiments" / "study.py"


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(STUDY_PATH.parent))  # what `python experiments/study.py` does: its siblings import
    spec = importlib.util.spec_from_file_location("mrpo_study", STUDY_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["mrpo_study"] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    yield module
    del sys.modules["mrpo_study"]
    sys.path.remove(str(STUDY_PATH.parent))


# ------------------------------------------------------------------------------------------------------------
# Grid expansion
# ------------------------------------------------------------------------------------------------------------


def test_quick_grid_is_start_four_methods_and_the_stability_arm(study):
    runs = study.expand_grid(study.QUICK, available_train_pairs=220)
    assert [run.name for run in runs] == [
        "start",
        "main/dpo/n64-s0",
        "main/mrpo/n64-s0",
        "main/mrpo_no_ctro/n64-s0",
        "main/mrpo_align/n64-s0",
        "stability/ctro_adaptive/n64-s0",
        "stability/ctro_fixed/n64-s0",
        "stability/ctro_off/n64-s0",
    ]


def test_full_grid_caps_sizes_at_the_train_split_and_runs_a_collapsed_size_once(study):
    settings = study.dataclasses.replace(study.FULL, sizes=(32, 128, 512))
    runs = study.expand_grid(settings, available_train_pairs=100)
    main = [run for run in runs if run.group == "main"]
    assert sorted({run.size for run in main}) == [32, 100]  # 128 and 512 both become 100, run once
    assert len(main) == 2 * len(settings.methods) * len(settings.seeds)
    assert len({run.name for run in runs}) == len(runs)
    assert {run.method for run in main} == set(study.METHODS)
    first_seed = main[: len(settings.methods)]  # seed-major: one seed's paired comparison completes first
    assert {run.seed for run in first_seed} == {0} and {run.size for run in first_seed} == {32}
    stability = [run for run in runs if run.group == "stability"]
    assert [run.size for run in stability] == [64, 64, 64]


def test_unknown_method_is_refused(study):
    settings = study.StudySettings(methods=("dpo", "ipo"))
    with pytest.raises(ValueError, match="ipo"):
        study.expand_grid(settings, 220)


def test_every_method_has_a_valid_loss_config_for_its_references(study):
    from mrpo.config.schema import LossConfig

    for method in [*study.METHODS.values(), *study.STABILITY_METHODS.values()]:
        loss = LossConfig(**method.loss)
        if isinstance(loss.weights, list):
            assert len(loss.weights) == len(method.references)
    assert study.METHODS["dpo_external"].references == ("external",)
    assert study.METHODS["mrpo_align"].loss == {"align": "pair"}


def test_settings_survive_json(study):
    assert study.StudySettings.from_json(json.loads(json.dumps(study.FULL.to_json()))) == study.FULL


# ------------------------------------------------------------------------------------------------------------
# Resume
# ------------------------------------------------------------------------------------------------------------


class FakeRunner:
    def __init__(self):
        self.calls = []

    def __call__(self, run, run_dir):
        self.calls.append(run.name)
        (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 0.7}\n', encoding="utf-8")
        accuracy = 0.5 + 0.01 * run.seed + (0.05 if run.method == "mrpo" else 0.0)
        return {
            "train": {"max_loss": 0.7, "nonfinite_steps": [], "final_loss": 0.6, "loss_curve": [[1, 0.7]]},
            "metrics": {"policy_accuracy": accuracy, "clip_rate": 0.5, "reward_accuracy_virtual": 0.6},
            "common": {"policy_accuracy": accuracy, "reward_accuracy_vs_smollm2": accuracy},
            "by_kind": {"arithmetic": {"policy_accuracy": accuracy}},
        }


def test_finished_runs_are_skipped_and_an_interrupted_run_is_redone_from_scratch(study, tmp_path):
    settings = study.StudySettings(sizes=(8,), seeds=(0, 1), methods=("dpo", "mrpo"), stability=())
    runs = study.expand_grid(settings, 100)
    first = FakeRunner()
    results = study.run_grid(runs, tmp_path, first, log=lambda _: None)
    assert first.calls == [run.name for run in runs]
    assert all((tmp_path / run.name / "result.json").exists() for run in runs)

    # Interrupt one run: its result is gone, a stale file remains.
    interrupted = tmp_path / "main/mrpo/n8-s1"
    (interrupted / "result.json").unlink()
    (interrupted / "stale.txt").write_text("partial", encoding="utf-8")
    second = FakeRunner()
    again = study.run_grid(runs, tmp_path, second, log=lambda _: None)
    assert second.calls == ["main/mrpo/n8-s1"]
    assert not (interrupted / "stale.txt").exists()
    assert [r["method"] for r in again] == [r["method"] for r in results]

    third = FakeRunner()
    study.run_grid(runs, tmp_path, third, log=lambda _: None)
    assert third.calls == []


def test_a_study_directory_refuses_other_settings_and_a_non_resume_start(study, tmp_path):
    study.check_settings(tmp_path, study.QUICK, resume=False)
    study.check_settings(tmp_path, study.QUICK, resume=True)
    with pytest.raises(SystemExit, match="--resume"):
        study.check_settings(tmp_path, study.QUICK, resume=False)
    with pytest.raises(SystemExit, match="other hyperparameters"):
        study.check_settings(
            tmp_path, study.dataclasses.replace(study.QUICK, learning_rate=1e-3), resume=True
        )
    grown = study.dataclasses.replace(
        study.QUICK, seeds=(0, 1, 2), methods=("dpo", "mrpo", "mrpo_fixed_alpha")
    )
    study.check_settings(tmp_path, grown, resume=True)  # the grid may grow on a resume
    saved = json.loads((tmp_path / "study.json").read_text(encoding="utf-8"))
    assert saved["seeds"] == [0, 1, 2]


# ------------------------------------------------------------------------------------------------------------
# Aggregation maths, on numbers checked by hand
# ------------------------------------------------------------------------------------------------------------


def test_mean_ci_is_the_student_t_interval(study):
    mean, half, n = study.mean_ci([1.0, 2.0, 3.0])
    # sd = 1, t_{0.975, 2} = 4.302653, half = 4.302653 / sqrt(3)
    assert (mean, n) == (2.0, 3)
    assert half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    mean, half, n = study.mean_ci([0.5, 0.7])
    # sd = 0.141421, t_{0.975, 1} = 12.706205, half = 12.706205 * 0.141421 / sqrt(2) = 1.2706205
    assert mean == pytest.approx(0.6)
    assert half == pytest.approx(1.2706205, rel=1e-6)


def test_mean_ci_with_one_value_has_no_interval_and_ignores_non_finite(study):
    mean, half, n = study.mean_ci([0.4, math.nan])
    assert (mean, n) == (0.4, 1) and math.isnan(half)
    mean, half, n = study.mean_ci([])
    assert n == 0 and math.isnan(mean) and math.isnan(half)


def _result(method, size, seed, accuracy, group="main"):
    return {
        "group": group,
        "method": method,
        "size": size,
        "seed": seed,
        "metrics": {"policy_accuracy": accuracy, "clip_rate": 0.0},
        "common": {"policy_accuracy": accuracy},
        "train": {"max_loss": 1.0},
    }


def test_paired_differences_pair_by_size_and_seed_only(study):
    results = [
        _result("dpo", 32, 0, 0.60),
        _result("dpo", 32, 1, 0.70),
        _result("mrpo", 32, 0, 0.65),
        _result("mrpo", 32, 1, 0.68),
        _result("mrpo", 32, 2, 0.99),  # no DPO run with seed 2: left out
        _result("dpo", 128, 0, 0.80),
        _result("mrpo", 128, 0, 0.70),
        _result("mrpo", 32, 0, 0.0, group="stability"),  # not part of the grid
    ]
    differences = study.paired_differences(results, "policy_accuracy")
    assert differences.keys() == {(32, "mrpo"), (128, "mrpo")}
    assert differences[(32, "mrpo")] == pytest.approx([0.05, -0.02])
    assert differences[(128, "mrpo")] == pytest.approx([-0.10])
    aggregated = study.aggregate(results, "policy_accuracy")
    assert aggregated[(32, "dpo")][0] == pytest.approx(0.65)
    assert aggregated[(32, "mrpo")][2] == 3


def test_loss_statistics_find_the_maximum_and_non_finite_steps(study, tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    lines = [
        {"step": 1, "loss": 0.69},
        {"step": 2, "loss": 12.5},
        {"step": 3, "loss": float("nan")},
        {"step": 3, "train_runtime": 4.0},
        {"step": 4, "loss": float("inf")},
        {"step": 5, "loss": 0.3},
    ]
    metrics.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    stats = study.loss_statistics(metrics)
    assert stats["logged_steps"] == 5
    assert stats["max_loss"] == 12.5
    assert stats["final_loss"] == 0.3
    assert stats["nonfinite_steps"] == [3, 4]


# ------------------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------------------


def test_report_renders_tables_and_says_when_one_seed_is_not_enough(study, tmp_path):
    settings = study.StudySettings(sizes=(8,), seeds=(0,), methods=("dpo", "mrpo"), stability=("ctro_off",))
    runs = study.expand_grid(settings, 100)
    results = study.run_grid(runs, tmp_path, FakeRunner(), log=lambda _: None)
    references = {
        "pairs": 4,
        "references": {
            name: {
                "accuracy": 0.5,
                "mean_logp": -10.0,
                "mean_abs_gap_to_init": 0.0,
                "accuracy_by_kind": {"arithmetic": 0.5},
            }
            for name in ("init", "external")
        },
    }
    plots = study.write_plots(results, tmp_path / "plots", "plots")
    assert (tmp_path / "plots" / "accuracy.png").exists() and "stability" in plots
    markdown = study.render_markdown(
        results, settings, references, title="t", command="c", machine="m", runtime_s=60.0,
        available_train_pairs=100, plots=plots,
    )  # fmt: skip
    assert "| 8 | `mrpo` | 1 | 55.0 |" in markdown
    assert "`mrpo` − `dpo` | 1 | +5.0 |" in markdown
    assert "not enough evidence" in markdown
    assert "not reproduced" in markdown  # the fake ctro_off run never reached a loss of 10
    assert "Not measured in this variant" in markdown  # no fixed-alpha runs


def test_runtime_estimate_scales_measured_seconds_per_step_to_the_grid(study):
    settings = study.StudySettings(
        sizes=(8, 16), seeds=(0,), methods=("dpo",), stability=(), epochs=2, batch_size=4
    )
    assert study.training_steps(8, settings) == 4
    assert study.training_steps(9, settings) == 6  # 3 batches per epoch
    measured = [
        {"group": "start", "train": {}, "eval_seconds": 10.0},
        {"group": "main", "train": {"seconds": 8.0, "pairs_used": 8}, "eval_seconds": 20.0},
    ]
    estimate = study.estimate_runtime(measured, settings, available_train_pairs=100)
    # 2 s per step; the grid: start + n8 (4 steps) + n16 (8 steps); 3 evaluations of 15 s
    assert estimate["seconds_per_step"] == 2.0
    assert estimate["steps"] == 12 and estimate["runs"] == 3
    assert estimate["hours"] == pytest.approx((12 * 2.0 + 3 * 15.0) / 3600)
    assert estimate["hours_at_fastest"] == pytest.approx((12 * 2.0 + 3 * 10.0) / 3600)


def _results(study, differences: dict[str, list[float]], sizes=(8, 16)):
    """Main runs whose policy accuracy differs from DPO's by the given values, one per (size, seed)."""
    results = []
    for method, values in {"dpo": None, **differences}.items():
        for index, (size, seed) in enumerate((size, seed) for size in sizes for seed in range(3)):
            accuracy = 0.6 + 0.01 * index + (0.0 if values is None else values[index])
            results.append(
                {
                    "group": "main", "method": method, "size": size, "seed": seed,
                    "common": {"policy_accuracy": accuracy},
                    "metrics": {"policy_accuracy": accuracy, "clip_rate": 0.0 if "no_ctro" in method else 0.9},
                    "train": {"max_loss": 0.8, "nonfinite_steps": []},
                }
            )  # fmt: skip
    return results


def test_pooled_differences_average_each_seed_over_sizes(study):
    # sizes 8 then 16, seeds 0..2 each: seed 0 has 0.01 (size 8) and 0.04 (size 16), and so on
    results = _results(study, {"mrpo": [0.01, 0.02, 0.03, 0.04, 0.05, 0.06]})
    pooled = study.pooled_differences(results, "policy_accuracy")
    assert pooled["mrpo"] == pytest.approx(
        [0.025, 0.035, 0.045]
    )  # one value per seed: the unit of the interval


def test_judge_names_the_interval(study):
    assert "supported" in study.judge(0.10, 0.02, 3)
    assert "weaker than claimed" in study.judge(0.03, 0.02, 3)
    assert "contradicted" in study.judge(-0.05, 0.02, 3)
    assert "contains 0" in study.judge(0.01, 0.05, 3)
    assert "one seed" in study.judge(0.10, math.nan, 1)


def test_verdicts_report_each_size_pooled_and_the_single_reference_claim(study):
    clearly_worse = [-0.05, -0.06, -0.05, -0.04, -0.05, -0.06]
    noisy = [0.05, -0.05, 0.04, -0.04, 0.01, -0.01]
    results = _results(
        study,
        {"mrpo": noisy, "mdpo": clearly_worse, "dpo_external": clearly_worse, "mrpo_no_ctro": noisy},
    )
    text = "\n".join(study.verdicts(results))
    assert "8 pairs: +1.3 ± 13.7 points" in text and "16 pairs: -1.3" in text
    assert "Pooled over sizes (one value per seed): +0.0" in text and "(n=3)" in text
    # mdpo is clearly behind, no multi-reference variant clearly ahead: the later study's claim holds here
    assert "3 multi-reference variants" in text and "above 0 for 0" in text
    assert "below 0 for 1 (`mdpo`)" in text and "**Supported**" in text
    assert "DPO with Gemma as the only reference − DPO with SmolLM2: -5.2" in text
    assert "`mrpo_no_ctro` clips 0.0%" in text and "`mrpo` clips 90.0%" in text


def test_sizes_flag_parses_and_refuses_nonsense(study):
    assert study.parse_sizes("32,128, 220") == (32, 128, 220)
    for bad in ("", "a,b", "0,32"):
        with pytest.raises(SystemExit, match="--sizes"):
            study.parse_sizes(bad)


def test_report_only_uses_the_saved_settings_and_leaves_them_alone(study, tmp_path):
    with pytest.raises(SystemExit, match="no study.json"):
        study.saved_settings(tmp_path)
    settings = study.StudySettings(sizes=(8,), seeds=(0, 1), methods=("dpo",), stability=())
    study.check_settings(tmp_path, settings, resume=False)
    before = (tmp_path / "study.json").read_text(encoding="utf-8")
    assert study.saved_settings(tmp_path) == settings
    assert (tmp_path / "study.json").read_text(encoding="utf-8") == before


def test_one_of_many_variants_excluding_zero_only_before_correction_settles_nothing(study):
    modest = [-0.02, -0.03, -0.04, -0.02, -0.03, -0.04]  # per seed -0.02, -0.03, -0.04: t95 excludes 0
    noisy = [0.05, -0.05, 0.04, -0.04, 0.01, -0.01]
    mean, half, n = study.mean_ci([-0.02, -0.03, -0.04])
    assert mean + half < 0  # uncorrected, the interval lies below 0
    text = "\n".join(study.verdicts(_results(study, {"mrpo": noisy, "mdpo": modest, "mrpo_no_ctro": noisy})))
    assert "below 0 for 0 (none)" in text and "**Not enough evidence**" in text
