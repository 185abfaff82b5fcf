"""The lm-eval tasks' facts come from the demo's tables: one source (they once disagreed on "Brasília")."""

from mrpo.demo import pairs
from mrpo.lm_eval_tasks import task_data


def test_lm_eval_facts_are_the_demo_facts():
    assert task_data.CAPITALS == {country: capital for country, capital, _, _ in pairs.CAPITALS}
    assert task_data.CHEMICAL_SYMBOLS == dict(pairs.ELEMENTS)
    rows = task_data.facts_rows()["test"]
    brazil = next(row for row in rows if row["question"] == "What is the capital of Brazil?")
    assert brazil["choices"][brazil["answer"]] == "Brasília"
