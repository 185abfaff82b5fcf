"""TruthfulQA-MC1 on the round-three students (issue 22): does an arm change what the policy does beyond the facts?

The paper reports a general benchmark beside preference accuracy. This scores the untrained start once and each
named arm's trained LoRA adapters (``students/<arm>/s<seed>/final`` of a teacher-study directory) on TruthfulQA MC1
through the lm-eval bridge (``mrpo_truthfulqa_mc1``: BIG-bench's ``truthful_qa/task_mc.json``, read from the path
given, never shipped). Every model keeps its per-question results, so arms compare paired by seed and by question.

    .venv/bin/python experiments/truthfulqa_students.py --study-dir runs/teacher-study \\
        --truthfulqa ../shared/data/truthful_qa/task_mc.json --arms dpo noctro_t1 --seeds 3

Writes ``--output`` (default ``docs/teacher-study/truthfulqa.json``) after every model, so a rerun skips the models
already in it (the same file, by SHA-256, is required). ``experiments/teacher_report.py`` renders it into
docs/results-teacher-study.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import stats
from grid import write_json_atomic

METRICS = ("acc", "acc_norm")
START = "start"


def model_key(arm: str, seed: int) -> str:
    return f"{arm}/s{seed}"


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def score(config, checkpoint: str | None, truthfulqa: Path) -> dict[str, list[float]]:
    """One model's per-question results: metric -> one 0/1 value per question, in the file's order."""
    from mrpo.lm_eval_bridge import run_lm_eval
    from mrpo.lm_eval_tasks.truthfulqa import TRUTHFULQA_TASK

    result = run_lm_eval(config, checkpoint, [], truthfulqa=truthfulqa, per_document=True)
    documents = result.documents[TRUTHFULQA_TASK]
    return {metric: [document[metric] for document in documents] for metric in METRICS}


def chance(truthfulqa: Path) -> float:
    """MC1 accuracy of a uniform guess: the mean over questions of 1 / the number of choices."""
    from mrpo.lm_eval_tasks.truthfulqa import read_truthfulqa

    rows = read_truthfulqa(truthfulqa)
    return sum(1 / len(row["choices"]) for row in rows) / len(rows)


def evaluate(
    study_dir: Path, truthfulqa: Path, arms: Sequence[str], seeds: Sequence[int], output: Path, log=print
) -> dict[str, Any]:
    """Score the start and every (arm, seed) adapter not yet in ``output``; return the file's content."""
    from mrpo.config.schema import load_config

    digest = file_sha256(truthfulqa)
    data: dict[str, Any] = {"truthfulqa_sha256": digest, "study_dir": str(study_dir), "models": {}}
    if output.exists():
        data = json.loads(output.read_text(encoding="utf-8"))
        if data["truthfulqa_sha256"] != digest:
            raise SystemExit(
                f"{output} was scored on another TruthfulQA file (SHA-256 {data['truthfulqa_sha256']})"
            )
    if "chance" not in data:  # files written before the chance level was kept gain it here
        data["chance"] = chance(truthfulqa)
        write_json_atomic(output, data)
    wanted = [(START, None)] + [(arm, seed) for seed in seeds for arm in arms]
    for arm, seed in wanted:
        key = START if seed is None else model_key(arm, seed)
        if key in data["models"]:
            continue
        # The start is scored with the first arm's config (the same policy model), without an adapter.
        run_dir = (
            study_dir
            / "students"
            / (arms[0] if seed is None else arm)
            / f"s{seeds[0] if seed is None else seed}"
        )
        checkpoint = None if seed is None else run_dir / "final"
        if not (run_dir / "mrpo_config.yaml").exists() or (checkpoint and not checkpoint.exists()):
            raise SystemExit(f"{run_dir}: no finished student run (mrpo_config.yaml and final/) to score")
        config = load_config(run_dir / "mrpo_config.yaml", check_training=False)
        begin = time.perf_counter()
        results = score(config, None if checkpoint is None else str(checkpoint), truthfulqa)
        data["models"][key] = {**results, "seconds": round(time.perf_counter() - begin, 1)}
        write_json_atomic(output, data)
        log(f"{key}: acc {_mean(results['acc']):.3f} ({data['models'][key]['seconds']:.0f} s)")
    return data


# ----------------------------------------------------------------------------------------------------------------
# Paired statistics and the report's section
# ----------------------------------------------------------------------------------------------------------------


def arm_seeds(data: dict[str, Any]) -> dict[str, dict[int, dict[str, list[float]]]]:
    """arm -> seed -> per-question results (the start not included)."""
    arms: dict[str, dict[int, dict[str, list[float]]]] = {}
    for key, results in data["models"].items():
        if key == START:
            continue
        arm, _, seed = key.rpartition("/s")
        arms.setdefault(arm, {})[int(seed)] = results
    return arms


def question_interval(differences: Sequence[float]) -> tuple[float, float, int]:
    """Mean and normal 95% half-width over questions (the questions are the sample)."""
    n = len(differences)
    if n < 2:
        return (differences[0] if n else math.nan), math.nan, n
    mean = sum(differences) / n
    variance = sum((d - mean) ** 2 for d in differences) / (n - 1)
    return mean, 1.96 * math.sqrt(variance / n), n


def compare(
    first: dict[int, dict[str, list[float]]],
    second: dict[int, dict[str, list[float]]] | dict[str, list[float]],
    metric: str,
) -> dict[str, tuple[float, float, int]]:
    """first - second, where ``second`` is per seed or one model (the start) for every seed: over seeds
    (t-interval) and over questions (each question's difference averaged over the seeds; normal interval)."""
    single = metric in second
    seeds = sorted(seed for seed in first if single or seed in second)

    def results(side, seed) -> list[float]:
        return side[metric] if side is second and single else side[seed][metric]

    by_seed = [_mean(results(first, s)) - _mean(results(second, s)) for s in seeds]
    questions = len(results(first, seeds[0])) if seeds else 0
    per_question = [
        sum(results(first, s)[q] - results(second, s)[q] for s in seeds) / len(seeds)
        for q in range(questions)
    ]
    return {"seeds": stats.mean_ci(by_seed), "questions": question_interval(per_question)}


def interval(value: tuple[float, float, int]) -> str:
    mean, half, n = value
    return f"{stats.interval_text(mean, half)} ({n})"


def report_lines(data: dict[str, Any] | None, descriptions: dict[str, str]) -> list[str]:
    """The page's TruthfulQA section (``descriptions``: arm -> what it is)."""
    if not data or START not in data["models"]:
        return []
    start = data["models"][START]
    arms = arm_seeds(data)
    rows = [f"| start | the untrained SmolLM2-135M-Instruct | {100 * _mean(start['acc']):.1f} | – | – | "
            f"{100 * _mean(start['acc_norm']):.1f} | – |"]  # fmt: skip
    for arm, seeds in arms.items():
        accuracy = stats.mean_ci([_mean(results["acc"]) for results in seeds.values()])
        versus_start = compare(seeds, start, "acc")
        versus_dpo = compare(seeds, arms["dpo"], "acc") if arm != "dpo" and "dpo" in arms else None
        norm = stats.mean_ci([_mean(results["acc_norm"]) for results in seeds.values()])
        rows.append(
            f"| {arm} | {descriptions.get(arm, arm)} | {stats.interval_text(*accuracy[:2], signed=False)} | "
            f"{interval(versus_start['seeds'])}; {interval(versus_start['questions'])} | "
            + (f"{interval(versus_dpo['seeds'])}; {interval(versus_dpo['questions'])}" if versus_dpo else "–")
            + f" | {stats.interval_text(*norm[:2], signed=False)} | {len(seeds)} |"
        )
    questions = len(start["acc"])
    return [
        "## A general benchmark: TruthfulQA-MC1",
        "",
        f"BIG-bench's TruthfulQA multiple choice ({questions} questions; `mrpo_truthfulqa_mc1` of the lm-eval bridge,"
        " MC1: right when the true answer has the highest log-likelihood; acc_norm per character), scored in fp32 "
        "on the start and on the trained adapters of the arms named, by `experiments/truthfulqa_students.py`. "
        "Accuracy in %, mean ± 95% t-interval over seeds; Δ in points, first paired by seed (t-interval, seeds), "
        "then per question (each question's difference averaged over the seeds; normal interval, questions).",
        "",
        "| model | what | acc | Δ vs start: seeds; questions | Δ vs DPO: seeds; questions | acc_norm | seeds |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        *([f"A uniform guess among each question's choices scores {100 * data['chance']:.1f}%.", ""]
          if "chance" in data else []),
        f"Per-question results: [teacher-study/truthfulqa.json](teacher-study/truthfulqa.json) (file SHA-256 "
        f"{data['truthfulqa_sha256'][:12]}…).",
        "",
    ]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study-dir", required=True, help="a teacher-study output directory")
    parser.add_argument("--truthfulqa", required=True, help="BIG-bench's truthful_qa/task_mc.json")
    parser.add_argument("--arms", nargs="+", default=["dpo"], help="arms whose adapters are scored")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 of each arm")
    parser.add_argument("--output", default="docs/teacher-study/truthfulqa.json")
    args = parser.parse_args(argv)
    evaluate(Path(args.study_dir), Path(args.truthfulqa), args.arms, range(args.seeds), Path(args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
