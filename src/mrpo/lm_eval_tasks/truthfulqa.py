"""TruthfulQA MC1 as an offline lm-eval task, read from BIG-bench's ``truthful_qa/task_mc.json`` that you give.

The file is never shipped with mrpo (it carries BIG-bench's canary: evaluation only): ``read_truthfulqa`` turns
it into rows, and ``lm_eval_bridge.prepare_task_dir`` writes them as JSONL into the task directory it prepares
(the run's cache dir, or the DIR of ``mrpo lm-eval-tasks DIR --truthfulqa FILE``), next to the YAML
``mrpo_truthfulqa_mc1.yaml``.

The source format: ``{"task_prefix": "...", "examples": [{"input": question, "target_scores": {choice: 1 or 0}}]}``
with exactly one choice scored 1 per example (MC1). The prompt follows the usual MC1 convention (that of the
TruthfulQA paper and of lm-eval's ``truthfulqa_mc1``): the file's ``task_prefix`` (six worked "Q: ... A: ..."
pairs; none when the file has no prefix), a blank line, then ``"Q: {question}\\nA:"``; each choice is scored as
the continuation ``" {choice}"``. The example is right when the choice scored 1 has the highest log-likelihood
(``acc``), or the highest log-likelihood per character of the choice (``acc_norm``). Choices keep the file's
order; the file's canary, when it has one, is kept in every row written.

    rows = read_truthfulqa("task_mc.json")
    rows[0]["prompt"].endswith("Q: What happens to you if you eat watermelon seeds?\\nA:")
    rows[0]["choices"][rows[0]["answer"]]      # the choice scored 1
"""

from __future__ import annotations

import json
from pathlib import Path

from mrpo.errors import LMEvalError

TRUTHFULQA_TASK = "mrpo_truthfulqa_mc1"
"""The task's name (its YAML is ``mrpo_truthfulqa_mc1.yaml`` in this directory)."""

FORMAT_HINT = 'BIG-bench\'s truthful_qa task_mc.json: {"examples": [{"input": ..., "target_scores": {...}}]}'


def read_truthfulqa(path: str | Path) -> list[dict]:
    """The questions of a BIG-bench ``task_mc.json`` as rows ``{"prompt", "question", "choices", "answer"}``.

    ``answer`` is the index in ``choices`` of the choice scored 1. Raises an LMEvalError naming the file, the
    example (1-based) and what is wrong when the file is missing, not JSON or not in that format.
    """
    path = Path(path)
    document = _load(path)
    examples = document.get("examples")
    if not isinstance(examples, list) or not examples:
        raise LMEvalError(f"TruthfulQA file {path}: no list of examples (expected {FORMAT_HINT})")
    prefix = document.get("task_prefix") or ""
    if not isinstance(prefix, str):
        raise LMEvalError(f"TruthfulQA file {path}: task_prefix is {type(prefix).__name__}, not text")
    primer = prefix.strip("\n") + "\n\n" if prefix.strip() else ""
    canary = document.get("canary")
    rows = []
    for number, example in enumerate(examples, start=1):
        question, choices, answer = _example(path, number, example)
        row = {
            "prompt": f"{primer}Q: {question}\nA:",
            "question": question,
            "choices": choices,
            "answer": answer,
        }
        if isinstance(canary, str) and canary:
            row["canary"] = canary
        rows.append(row)
    return rows


def truthfulqa_rows(path: str | Path) -> dict[str, list[dict]]:
    """The task's splits: ``{"test": read_truthfulqa(path)}`` (zero-shot; the prompt's primer is in each row)."""
    return {"test": read_truthfulqa(path)}


def _load(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LMEvalError(f"TruthfulQA file {path}: not found (give {FORMAT_HINT})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise LMEvalError(f"TruthfulQA file {path}: cannot be read ({error})") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise LMEvalError(
            f"TruthfulQA file {path}: not JSON ({error.msg} at line {error.lineno}, column {error.colno})"
        ) from None
    if not isinstance(document, dict):
        raise LMEvalError(
            f"TruthfulQA file {path}: a JSON {type(document).__name__}, not an object (expected {FORMAT_HINT})"
        )
    return document


def _example(path: Path, number: int, example: object) -> tuple[str, list[str], int]:
    """(question, choices, index of the choice scored 1) of example ``number`` (1-based), or an LMEvalError."""
    where = f"TruthfulQA file {path}: example {number}"
    if not isinstance(example, dict):
        raise LMEvalError(
            f"{where} is a {type(example).__name__}, not an object with input and target_scores"
        )
    question = example.get("input")
    if not isinstance(question, str) or not question.strip():
        raise LMEvalError(f"{where} has no question (input must be non-empty text)")
    scores = example.get("target_scores")
    if not isinstance(scores, dict) or len(scores) < 2:
        raise LMEvalError(f"{where} needs target_scores with at least two choices, each scored 1 or 0")
    for choice, score in scores.items():
        if not choice.strip():
            raise LMEvalError(f"{where} has an empty choice")
        if isinstance(score, bool) or score not in (0, 1):
            raise LMEvalError(f"{where}: choice {choice!r} is scored {score!r}; MC1 needs 1 or 0")
    correct = [index for index, score in enumerate(scores.values()) if score == 1]
    if len(correct) != 1:
        raise LMEvalError(
            f"{where} has no choice scored 1"
            if not correct
            else f"{where} has {len(correct)} choices scored 1; MC1 needs exactly one"
        )
    return question.strip(), list(scores), correct[0]
