"""The data of mrpo's lm-eval tasks: the facts come from the demo's tables (one source: they once disagreed on
"Brasília"); TruthfulQA MC1 is read from the user's BIG-bench file (a made-up fixture here), never shipped."""

import json
from pathlib import Path

import pytest

from mrpo.demo import pairs
from mrpo.errors import LMEvalError
from mrpo.lm_eval_tasks import TASK_DIR, task_data
from mrpo.lm_eval_tasks.truthfulqa import read_truthfulqa


def test_lm_eval_facts_are_the_demo_facts():
    assert task_data.CAPITALS == {country: capital for country, capital, _, _ in pairs.CAPITALS}
    assert task_data.CHEMICAL_SYMBOLS == dict(pairs.ELEMENTS)
    rows = task_data.facts_rows()["test"]
    brazil = next(row for row in rows if row["question"] == "What is the capital of Brazil?")
    assert brazil["choices"][brazil["answer"]] == "Brasília"


# ----------------------------------------------------------------------------------------------------------------
# TruthfulQA MC1: read from BIG-bench's task_mc.json the user gives, never shipped
# ----------------------------------------------------------------------------------------------------------------

FIXTURE = Path(__file__).parent / "data" / "truthfulqa_mc_fixture.json"
"""Five made-up questions in BIG-bench's truthful_qa task_mc.json format."""


def test_truthfulqa_rows_are_the_fixture_questions_in_the_mc1_prompt():
    source = json.loads(FIXTURE.read_text())
    rows = read_truthfulqa(FIXTURE)
    assert [len(row["choices"]) for row in rows] == [3, 4, 3, 5, 2]
    for row, example in zip(rows, source["examples"], strict=True):
        assert row["choices"] == list(example["target_scores"])  # the file's order
        assert example["target_scores"][row["choices"][row["answer"]]] == 1
        assert row["prompt"] == (
            "Q: What is two plus two?\nA: Two plus two is four.\n\nQ: What colour is snow?\nA: Snow is white."
            f"\n\nQ: {example['input']}\nA:"
        )
        assert row["canary"] == source["canary"]  # the data stays marked wherever its JSONL goes
    assert [row["answer"] for row in rows] == [0, 1, 2, 4, 1]


def test_truthfulqa_without_a_primer_or_canary_asks_the_bare_question(tmp_path):
    source = json.loads(FIXTURE.read_text())
    del source["task_prefix"], source["canary"]
    path = tmp_path / "bare.json"
    path.write_text(json.dumps(source))
    row = read_truthfulqa(path)[0]
    assert row["prompt"] == "Q: What colour is a ripe banana?\nA:" and "canary" not in row


def _broken(example_number: int, **fields) -> dict:
    source = json.loads(FIXTURE.read_text())
    source["examples"][example_number - 1].update(fields)
    return source


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "not found"),
        ("{not json", "not JSON"),
        ([1, 2], "a JSON list, not an object"),
        ({"examples": []}, "no list of examples"),
        (_broken(2, target_scores={"Six.": 0, "Eight.": 0}), "example 2 has no choice scored 1"),
        (
            _broken(3, target_scores={"a": 1, "b": 1, "c": 0}),
            "example 3 has 2 choices scored 1; MC1 needs exactly one",
        ),
        (_broken(1, target_scores={"a": 1, "b": 0.5}), "example 1: choice 'b' is scored 0.5"),
        (_broken(4, target_scores={"only": 1}), "example 4 needs target_scores with at least two choices"),
        (_broken(5, input=""), "example 5 has no question"),
        (_broken(1, target_scores={"a": 1, " ": 0}), "example 1 has an empty choice"),
    ],
)
def test_a_bad_truthfulqa_file_is_one_line_naming_the_file_and_the_example(tmp_path, content, message):
    path = tmp_path / "task_mc.json"
    if content is not None:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(LMEvalError) as error:
        read_truthfulqa(path)
    assert str(error.value).startswith(f"TruthfulQA file {path}") and message in str(error.value)
    assert "\n" not in str(error.value)


def test_no_truthfulqa_data_is_written_into_or_shipped_with_the_package(tmp_path):
    from mrpo.lm_eval_bridge import prepare_task_dir

    package = Path(__file__).resolve().parents[1] / "src" / "mrpo"
    before = {path: path.stat().st_mtime_ns for path in package.rglob("*") if "__pycache__" not in path.parts}
    directory = prepare_task_dir(tmp_path / "tasks", truthfulqa=FIXTURE)
    after = {path: path.stat().st_mtime_ns for path in package.rglob("*") if "__pycache__" not in path.parts}
    assert after == before  # nothing written into the package
    written = (directory / "mrpo_truthfulqa_mc1" / "test.jsonl").read_text()
    assert [json.loads(line) for line in written.splitlines()] == read_truthfulqa(FIXTURE)
    # The package holds the task's YAML only: no BIG-bench data (its canary) and no copy of the user's file.
    assert (TASK_DIR / "mrpo_truthfulqa_mc1.yaml").is_file()
    for path in (path for path in package.rglob("*") if path.is_file() and path.suffix != ".pyc"):
        text = path.read_text(encoding="utf-8", errors="replace")
        assert "canary GUID" not in text and "What colour is a ripe banana?" not in text, path
        assert path.suffix == ".py" or "target_scores" not in text, path
