"""experiments/teacher_study.py and teacher_report.py: the data's guarantees (no teacher pair is ever a student or
test pair), the probe's statistics, the decision rule and the report on fake results (no models)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(EXPERIMENTS))
    names = ("teacher_study", "teacher_report")
    loaded = [_load(name) for name in names]
    yield loaded[0]
    for name in (*names, "noisy_study", "truthfulqa_students"):
        sys.modules.pop(name, None)
    sys.path.remove(str(EXPERIMENTS))


@pytest.fixture(scope="module")
def report(study):
    return sys.modules["teacher_report"]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _question_answer(record: dict) -> tuple[str, str, str]:
    return record["prompt"][0]["content"], record["chosen"][0]["content"], record["rejected"][0]["content"]


def test_teacher_pairs_are_never_student_or_test_pairs(study, tmp_path):
    settings = study.Settings(seeds=(0, 1), secondary_seeds=(2,))
    paths = study.write_study_data(settings, tmp_path)
    teacher = _rows(paths["teacher"])
    student_and_test = [_rows(paths["probe"]), _rows(paths["disjoint"])]
    for seed in (0, 1, 2):
        student_and_test += [
            _rows(tmp_path / f"s{seed}" / name) for name in ("train.jsonl", "reworded.jsonl")
        ]
    taught = {_question_answer(r) for r in teacher}
    seen = {_question_answer(r) for rows in student_and_test for r in rows}
    assert not taught & seen
    taught_questions = {r["prompt"][0]["content"] for r in teacher}
    assert not taught_questions & {r["prompt"][0]["content"] for rows in student_and_test for r in rows}
    # Clean labels, the teacher wordings only, the known facts only, each in both teacher wordings.
    assert all(not r["flipped"] and r["teacher_known"] for r in teacher)
    assert {r["wording"] for r in teacher} == set(study.reworded_facts.TEACHER_WORDINGS)
    assert Counter(Counter(r["fact"] for r in teacher).values()) == {2: len(teacher) // 2}


def test_known_facts_are_half_the_pool_round_robin_over_kinds_and_none_disjoint(study, tmp_path):
    settings = study.Settings(seeds=(0,), secondary_seeds=())
    known = study.known_facts(settings)
    pool, disjoint = study.reworded_facts.split_facts(study.reworded_facts.all_facts())
    assert len(known) == round(0.5 * len(pool))
    assert not known & {f.key for f in disjoint}
    pool_kinds = Counter(f.kind for f in pool)
    known_kinds = Counter(f.kind for f in pool if f.key in known)
    # Drawn round-robin over the kinds: every kind not exhausted has the same count, within one.
    open_counts = [known_kinds[kind] for kind, n in pool_kinds.items() if known_kinds[kind] < n]
    assert max(open_counts) - min(open_counts) <= 1


def test_reworded_pairs_carry_true_labels_and_the_training_flip(study, tmp_path):
    settings = study.Settings(seeds=(0,), secondary_seeds=())
    study.write_study_data(settings, tmp_path)
    train = _rows(tmp_path / "s0" / "train.jsonl")
    assert len(train) == 64 and sum(r["flipped"] for r in train) == 19
    clean = _rows(tmp_path / "s0" / "train-clean.jsonl")
    assert len(clean) == 45 and not any(r["flipped"] for r in clean)
    flipped = {r["fact"] for r in train if r["flipped"]}
    reworded = _rows(tmp_path / "s0" / "reworded.jsonl")
    assert len(reworded) == 128
    facts = {f.key: f for f in study.reworded_facts.all_facts()}
    for record in reworded:
        assert record["trained_flipped"] == (record["fact"] in flipped)
        assert record["wording"] in (1, 2) and not record["flipped"]
        fact = facts[record["fact"]]
        assert record["chosen"][0]["content"] == fact.templates[record["wording"]][1](fact.right)


def test_knowledge_measures_agreement_against_the_start_by_known_facts(study):
    # Start: right on the first 6 of 8 pairs. Teacher: right on all known pairs (0-3) with larger margins, and
    # identical to the start on the unknown ones.
    start = torch.tensor([2.0, 2.0, 1.0, 1.0, 1.0, 1.0, -1.0, -1.0])
    teacher = torch.tensor([5.0, 5.0, 5.0, 5.0, 1.0, 1.0, -1.0, -1.0])
    start[2:4] = -1.0  # the start is wrong on known pairs 2 and 3
    known = [True] * 4 + [False] * 4
    result = study.knowledge(("init", "t1"), torch.stack([start, teacher]), known)
    t1 = result["t1"]
    assert t1["known"]["agreement"] == 1.0 and result["init"]["known"]["agreement"] == 0.5
    assert t1["known"]["vs_start"]["difference"] == pytest.approx(0.5)
    assert t1["known"]["beyond_start"] == 1.0  # on the label's side and above the start's margin everywhere
    assert t1["unknown"]["vs_start"]["difference"] == 0.0
    assert t1["unknown"]["beyond_start"] == 0.0
    assert t1["all"]["less_confident"] == 0.0


def test_paired_interval_covers_the_difference_and_is_zero_width_when_identical(study):
    same = study.paired_rate_difference([True, False, True], [True, False, True])
    assert same["difference"] == 0.0 and same["low"] == 0.0 and same["high"] == 0.0
    better = study.paired_rate_difference([True] * 30, [True] * 15 + [False] * 15)
    assert better["difference"] == 0.5 and 0.3 < better["low"] < 0.5 < better["high"]


def _result(arm: str, seed: int, accuracy: float) -> dict:
    family = {
        "policy_accuracy": accuracy,
        "by_group": {"known_flipped": {"policy_accuracy": accuracy, "pairs": 18}},
        "paper_metric_step0": {"reward_accuracy_own_virtual": 0.3, "reward_accuracy_start": 0.0},
        "paper_metric_trained": {"reward_accuracy_own_virtual": 0.7, "reward_accuracy_start": 0.7},
        "chosen_longer": 0.5,
    }
    return {
        "group": "main",
        "arm": arm,
        "seed": seed,
        "train": {"last_epoch_loss": 0.4, "clip_rate": 0.5},
        "eval": {"reworded": family, "disjoint": family},
    }


def _probe(beats: bool) -> dict:
    low = 0.05 if beats else -0.02
    entry = {"known": {"vs_start": {"difference": 0.1, "low": low, "high": 0.2}}}
    return {"group": "probe", "arm": "probe", "probe": {"t1": entry}}


def _grid(arms: dict[str, float], seeds: int = 10) -> list[dict]:
    # Each arm's accuracy on seed s is its level plus a seed effect shared by every arm, plus a little noise, so
    # paired differences are tight.
    return [
        _result(arm, seed, level + 0.01 * seed + 0.002 * ((seed * 7 + len(arm)) % 3))
        for arm, level in arms.items()
        for seed in range(seeds)
    ]


@pytest.mark.parametrize(
    ("levels", "beats", "expected"),
    [
        ({"dpo": 0.70, "mrpo_t1": 0.76, "mrpo_random": 0.70}, True, "a teacher helps through MRPO"),
        # Beats DPO but not the random control: self-sharpening, not the teacher.
        ({"dpo": 0.70, "mrpo_t1": 0.76, "mrpo_random": 0.76}, True, "null"),
        (
            {"dpo": 0.70, "mrpo_t1": 0.70, "mrpo_random": 0.70, "dpo_ref_t1": 0.76},
            True,
            "only a better single",
        ),
        ({"dpo": 0.70, "mrpo_t1": 0.71, "mrpo_random": 0.70}, True, "null"),
        ({"dpo": 0.70, "mrpo_t1": 0.76, "mrpo_random": 0.70}, False, "not judged"),
    ],
)
def test_decision_rule(report, levels, beats, expected):
    results = _grid(levels)
    verdict = report.judge(report.cells_of(results), _probe(beats), "t1")
    assert expected in verdict


def test_one_seed_is_not_judged(report):
    results = _grid({"dpo": 0.70, "mrpo_t1": 0.80, "mrpo_random": 0.70}, seeds=1)
    assert "not judged yet" in report.judge(report.cells_of(results), _probe(True), "t1")


def test_report_renders_every_section_on_fake_results(study, report, tmp_path):
    settings = study.Settings(seeds=tuple(range(3)), teachers=("t1",))
    results = _grid({"dpo": 0.7, "mrpo_t1": 0.72, "mrpo_random": 0.7, "dpo_ref_t1": 0.76}, seeds=3)
    results.append(
        {"group": "teacher", "arm": "t1", "base": "init", "pairs": 192, "seconds_train": 60.0,
         "train": {"last_epoch_loss": 0.2}}
    )  # fmt: skip
    probe = _probe(True)
    probe["probe"]["t1"]["known"].update(agreement=0.9, mean_abs_margin=6.0, beyond_start=0.6)
    probe["probe"]["t1"]["all"] = {"less_confident": 0.2, "agreement": 0.85}
    probe["disjoint"] = {"t1": {"all": {"agreement": 0.7}}}
    results.append(probe)
    docs = tmp_path / "docs" / "results-teacher-study.md"
    docs.parent.mkdir()
    report.write_report(results, settings, [], docs, machine="test")
    text = docs.read_text(encoding="utf-8")
    for heading in (
        "## Decision rule",
        "## Verdict",
        "## The teachers",
        "## Students",
        "## The paper's metric",
    ):
        assert heading in text
    assert "(b) mrpo_t1" in text and "+2.0" in text  # the paired difference in points
    # What MRPO adds to the teacher itself: each MRPO arm against DPO with the teacher alone.
    assert "Against DPO with t1 as its only reference (dpo_ref_t1), in points on reworded" in text
    assert (
        "stopped and resumed (those invocations did not run to the end" in text
    )  # none recorded: still says how
    assert "(b) mrpo_t1 -4.0 ± " in text
    summary = json.loads((docs.parent / "teacher-study" / "summary.json").read_text(encoding="utf-8"))
    assert len(summary["results"]) == len(results)
    assert (docs.parent / "teacher-study" / "paired.png").exists()
    assert not math.isnan(summary["settings"]["learning_rate"])


def _finished(directory: Path, result: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "result.json").write_text(json.dumps(result), encoding="utf-8")


def _study_dir(study, root: Path, *, teacher_loss: float) -> tuple[Path, list]:
    """A run directory whose teachers and probe are finished (tiny weight files), and the grid's runs."""
    output = root / "runs"
    settings = study.Settings(seeds=(0, 1), arms=("dpo", "mrpo_t1"), secondary_arms=(), secondary_seeds=())
    runs = study.expand_grid(settings)
    for name in settings.teachers:
        merged = output / "teachers" / name / "merged"
        merged.mkdir(parents=True)
        (merged / "model.safetensors").write_bytes(name.encode() * 8)
        _finished(
            output / "teachers" / name,
            {
                "group": "teacher",
                "arm": name,
                "seed": 0,
                "merged": str(merged),
                "train": {"loss": teacher_loss, "clip_rate": math.nan},  # K = 1 logs no clip rate
            },
        )
    _finished(
        output / "probe", {"group": "probe", "arm": "probe", "seed": 0, "probe": {"a": 1}, "disjoint": {}}
    )
    return output, runs


def test_reuse_takes_the_summary_students_only_when_the_teachers_are_the_same(study, tmp_path):
    source, runs = _study_dir(study, tmp_path / "earlier", teacher_loss=0.25)
    for name in ("t1", "t2"):
        merged = source / "teachers" / name / "merged"
        result = json.loads((source / "teachers" / name / "result.json").read_text())
        result["weights_sha256"] = study.weights_sha256(merged)
        (source / "teachers" / name / "result.json").write_text(json.dumps(result))
    recorded = [json.loads(p.read_text()) for p in sorted(source.glob("**/result.json"))]
    recorded.append({"group": "start", "arm": "start", "seed": 0, "eval": {"x": 1}})
    recorded.append({"group": "main", "arm": "dpo", "seed": 0, "eval": {"x": 2}})
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"settings": {}, "results": recorded}))

    same, _ = _study_dir(study, tmp_path / "same", teacher_loss=0.25)
    _finished(same / "students" / "dpo" / "s0", {"group": "main", "arm": "dpo", "seed": 0, "eval": {"x": 9}})
    assert study.reuse_summary(summary, same, runs, log=lambda _: None) == 1  # start/s0; its own dpo/s0 kept
    start = json.loads((same / "start" / "s0" / "result.json").read_text())
    assert start["eval"] == {"x": 1} and start["reused_from"] == str(summary)
    assert json.loads((same / "students" / "dpo" / "s0" / "result.json").read_text())["eval"] == {"x": 9}
    assert not (same / "students" / "mrpo_t1" / "s0").exists()  # not in the summary: still to run
    teacher = json.loads((same / "teachers" / "t1" / "result.json").read_text())
    assert teacher["weights_sha256"] == study.weights_sha256(same / "teachers" / "t1" / "merged")

    other, _ = _study_dir(study, tmp_path / "other", teacher_loss=0.5)  # a teacher trained otherwise
    with pytest.raises(SystemExit, match="teachers/t1 differs"):
        study.reuse_summary(summary, other, runs, log=lambda _: None)
    assert not (other / "start").exists()

    changed, _ = _study_dir(study, tmp_path / "changed", teacher_loss=0.25)  # same statistics, other weights
    (changed / "teachers" / "t2" / "merged" / "model.safetensors").write_bytes(b"other")
    with pytest.raises(SystemExit, match="teachers/t2 differs"):
        study.reuse_summary(summary, changed, runs, log=lambda _: None)


def test_reuse_waits_for_the_teachers_and_probe(study, tmp_path):
    output, runs = _study_dir(study, tmp_path, teacher_loss=0.25)
    (output / "probe" / "result.json").unlink()
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"settings": {}, "results": []}))
    assert study.reuse_summary(summary, output, runs, log=lambda _: None) == 0


# ------------------------------------------------------------------------------------------------------------
# TruthfulQA on the students (experiments/truthfulqa_students.py)
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def truthfulqa(report):
    return sys.modules["truthfulqa_students"]


def _answers(*bits: int) -> dict[str, list[float]]:
    return {"acc": [float(b) for b in bits], "acc_norm": [float(1 - b) for b in bits]}


def test_truthfulqa_differences_are_paired_by_seed_and_by_question(truthfulqa):
    start = _answers(1, 0, 0, 0)  # 25%
    dpo = {0: _answers(1, 1, 0, 0), 1: _answers(1, 0, 0, 0)}  # 50%, 25%
    arm = {0: _answers(1, 1, 1, 0), 1: _answers(1, 1, 0, 0)}  # 75%, 50%
    versus_start = truthfulqa.compare(arm, start, "acc")
    mean, half, n = versus_start["seeds"]
    assert (mean, n) == (pytest.approx(0.375), 2) and half > 0  # (0.5 + 0.25) / 2
    per_question = [0.0, 1.0, 0.5, 0.0]  # each question's difference averaged over the two seeds
    mean, half, n = versus_start["questions"]
    expected = sum(per_question) / 4
    variance = sum((d - expected) ** 2 for d in per_question) / 3
    assert (mean, half, n) == (pytest.approx(expected), pytest.approx(1.96 * math.sqrt(variance / 4)), 4)
    versus_dpo = truthfulqa.compare(arm, dpo, "acc")
    assert versus_dpo["seeds"][0] == pytest.approx(0.25) and versus_dpo["seeds"][1] == pytest.approx(0.0)
    # The same seeds only: a seed the baseline lacks is left out, not compared with nothing.
    assert truthfulqa.compare({**arm, 2: _answers(0, 0, 0, 0)}, dpo, "acc") == versus_dpo


def test_truthfulqa_section_of_the_report(truthfulqa):
    data = {
        "truthfulqa_sha256": "ab" * 32,
        "models": {"start": _answers(1, 0, 0, 0), "dpo/s0": _answers(1, 1, 0, 0), "dpo/s1": _answers(1, 0, 0, 0),
                   "noctro_t1/s0": _answers(1, 1, 1, 0), "noctro_t1/s1": _answers(1, 1, 0, 0)},
    }  # fmt: skip
    lines = truthfulqa.report_lines(data, {"noctro_t1": "MRPO without CTRO, t1"})
    text = "\n".join(lines)
    assert "## A general benchmark: TruthfulQA-MC1" in text and "4 questions" in text
    start_row, dpo_row, arm_row = [line for line in lines if line.startswith("| ") and "---" not in line][1:4]
    assert start_row.startswith("| start |") and "| 25.0 |" in start_row
    assert dpo_row.startswith("| dpo |") and "+12.5" in dpo_row and dpo_row.split("|")[5].strip() == "–"
    assert arm_row.startswith("| noctro_t1 | MRPO without CTRO, t1 | 62.5") and "+37.5" in arm_row
    assert "+25.0" in arm_row.split("|")[5]  # against DPO, paired by seed
    assert "uniform guess" not in text  # an older file without the chance level
    with_chance = truthfulqa.report_lines({**data, "chance": 0.2544}, {})
    assert "A uniform guess among each question's choices scores 25.4%." in with_chance
    assert truthfulqa.report_lines(None, {}) == [] and truthfulqa.report_lines({"models": {}}, {}) == []


def test_truthfulqa_evaluation_scores_each_model_once_and_checks_the_file(truthfulqa, tmp_path, monkeypatch):
    study_dir, questions = tmp_path / "runs", tmp_path / "task_mc.json"
    examples = [
        {"input": "Two choices?", "target_scores": {"yes": 1, "no": 0}},
        {"input": "Four choices?", "target_scores": {"a": 0, "b": 1, "c": 0, "d": 0}},
    ]
    questions.write_text(json.dumps({"examples": examples}), encoding="utf-8")
    for arm in ("dpo", "noctro_t1"):
        for seed in (0, 1):
            run = study_dir / "students" / arm / f"s{seed}"
            (run / "final").mkdir(parents=True)
            (run / "mrpo_config.yaml").write_text(
                f"policy:\n  model: {arm}-{seed}\nreferences:\n  - name: init\n    model: {arm}-{seed}\n"
                "data:\n  train: train.jsonl\n",
                encoding="utf-8",
            )
    scored = []

    def fake_score(config, checkpoint, path):
        scored.append((config.policy.model, checkpoint))
        return _answers(1, 0)

    monkeypatch.setattr(truthfulqa, "score", fake_score)
    output = tmp_path / "truthfulqa.json"
    data = truthfulqa.evaluate(
        study_dir, questions, ["dpo", "noctro_t1"], range(2), output, log=lambda _: None
    )
    assert list(data["models"]) == ["start", "dpo/s0", "noctro_t1/s0", "dpo/s1", "noctro_t1/s1"]
    assert scored[0] == ("dpo-0", None)  # the start: no adapter
    assert scored[1:] == [
        (f"{arm}-{seed}", str(study_dir / "students" / arm / f"s{seed}" / "final"))
        for seed in (0, 1)
        for arm in ("dpo", "noctro_t1")
    ]
    assert json.loads(output.read_text(encoding="utf-8")) == data
    assert data["chance"] == pytest.approx((1 / 2 + 1 / 4) / 2)  # a uniform guess, question by question
    scored.clear()
    assert (
        truthfulqa.evaluate(study_dir, questions, ["dpo", "noctro_t1"], range(2), output, log=print) == data
    )
    assert scored == []  # every model was already in the file
    with pytest.raises(SystemExit, match="no finished student run"):
        truthfulqa.evaluate(study_dir, questions, ["dpo"], range(3), output, log=print)
    questions.write_text('{"other": 1}', encoding="utf-8")
    with pytest.raises(SystemExit, match="another TruthfulQA file"):
        truthfulqa.evaluate(study_dir, questions, ["dpo"], range(2), output, log=print)


def test_ran_as_names_the_recorded_invocations_and_the_stopped_ones_before_them(report):
    results = [
        {"seconds": 1800.0},
        {"seconds": 1800.0},
        {"seconds": 3600.0, "reused_from": "x"},
        {"seconds": 0.0},
    ]
    invocations = [
        {"command": "teacher_study.py --report-only", "runtime_s": 1.0, "runs_run": 0},
        {"command": "teacher_study.py --resume", "runtime_s": 600.0, "runs_run": 1},
    ]
    text = report.ran_as(results, invocations, "teacher_study")
    assert text.startswith(
        "2 runs by `.venv/bin/python experiments/teacher_study.py --resume`, stopped and resumed"
    )
    assert "; `teacher_study.py --resume` (10 min, 1 runs); the runs done here took 1.0 h in all" in text
    assert report.ran_as(results[:1], invocations, "x") == "`teacher_study.py --resume` (10 min, 1 runs)"
