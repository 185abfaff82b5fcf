"""The data of the lm-eval tasks mrpo ships (``mrpo_arithmetic``, ``mrpo_facts``), generated deterministically.

The rows depend on nothing but this file and the fact tables of ``mrpo.demo.pairs`` (one source for the facts), so
every machine -- offline ones included -- evaluates on the same questions. ``lm_eval_bridge.prepare_task_dir``
writes them as JSONL next to the task YAMLs at run time.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from mrpo.demo import pairs as demo_pairs

ARITHMETIC_TEST_ROWS = 200
ARITHMETIC_FEWSHOT_ROWS = 10

# One source for the facts: the tables the demo's preference pairs are built from.
CAPITALS = {country: capital for country, capital, _, _ in demo_pairs.CAPITALS}
"""Country -> capital."""

CHEMICAL_SYMBOLS = dict(demo_pairs.ELEMENTS)
"""Element -> chemical symbol."""


def arithmetic_rows(seed: int = 0) -> dict[str, list[dict]]:
    """Additions and subtractions of two numbers below 100 (results >= 0): ``{"train": few-shot, "test": ...}``.

    A row: ``{"question": "What is 17 + 25?", "answer": "42"}``.
    """
    rng = random.Random(f"mrpo_arithmetic-{seed}")
    seen: set[tuple[int, str, int]] = set()
    rows: list[dict] = []
    while len(rows) < ARITHMETIC_FEWSHOT_ROWS + ARITHMETIC_TEST_ROWS:
        a, b, op = rng.randint(1, 99), rng.randint(1, 99), rng.choice("+-")
        if op == "-" and b > a:
            a, b = b, a
        if (a, op, b) in seen:
            continue
        seen.add((a, op, b))
        rows.append({"question": f"What is {a} {op} {b}?", "answer": str(a + b if op == "+" else a - b)})
    return {"train": rows[:ARITHMETIC_FEWSHOT_ROWS], "test": rows[ARITHMETIC_FEWSHOT_ROWS:]}


def facts_rows(seed: int = 0) -> dict[str, list[dict]]:
    """Capital and chemical-symbol questions with four choices (three distractors of the same kind).

    A row: ``{"question": "What is the capital of France?", "choices": [4 strings], "answer": index, "kind": ...}``.
    """
    rng = random.Random(f"mrpo_facts-{seed}")
    rows = []
    for kind, table, question in (
        ("capital", CAPITALS, "What is the capital of {}?"),
        ("chemical_symbol", CHEMICAL_SYMBOLS, "What is the chemical symbol of {}?"),
    ):
        values = list(table.values())
        for subject, correct in table.items():
            choices = [correct, *rng.sample([value for value in values if value != correct], 3)]
            rng.shuffle(choices)
            rows.append(
                {
                    "question": question.format(subject),
                    "choices": choices,
                    "answer": choices.index(correct),
                    "kind": kind,
                }
            )
    return {"test": rows}


SHIPPED_TASKS: dict[str, Callable[[], dict[str, list[dict]]]] = {
    "mrpo_arithmetic": arithmetic_rows,
    "mrpo_facts": facts_rows,
}
"""Task name (its YAML is ``<name>.yaml`` in this directory) -> the function that generates its splits."""
