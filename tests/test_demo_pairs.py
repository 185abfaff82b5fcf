"""The built-in demo pairs: deterministic, every chosen answer right and every rejected one wrong, a clean split."""

import json
import re
from collections import Counter

import pytest

from mrpo.data.sources import load_pairs, pairs_from_records
from mrpo.demo.pairs import (
    CAPITALS,
    ELEMENTS,
    KINDS,
    OPPOSITES,
    generate_pairs,
    train_test_split,
    write_demo_data,
)

# Written out by hand here, independently of the module's table.
UNIT_FACTORS = {
    ("kilometres", "metres"): 1000,
    ("metres", "centimetres"): 100,
    ("centimetres", "millimetres"): 10,
    ("kilograms", "grams"): 1000,
    ("litres", "millilitres"): 1000,
    ("hours", "minutes"): 60,
    ("minutes", "seconds"): 60,
    ("days", "hours"): 24,
    ("weeks", "days"): 7,
    ("years", "months"): 12,
}
SOME_CAPITALS = {
    "France": "Paris",
    "Australia": "Canberra",
    "Canada": "Ottawa",
    "Nigeria": "Abuja",
    "Switzerland": "Bern",
    "Brazil": "Brasília",
    "Japan": "Tokyo",
}
SOME_SYMBOLS = {"gold": "Au", "sodium": "Na", "iron": "Fe", "potassium": "K", "tungsten": "W", "tin": "Sn"}


def _text(messages):
    (message,) = messages
    return message["content"]


def _claimed_value(record, completion):
    """(the fact the prompt asks for, computed independently; the value the completion claims)."""
    question, answer = _text(record["prompt"]), _text(record[completion])
    kind = record["kind"]
    if kind == "arithmetic":
        a, operator, b = re.fullmatch(r"What is (\d+) ([+\-×]) (\d+)\?", question).groups()
        truth = {"+": int(a) + int(b), "-": int(a) - int(b), "×": int(a) * int(b)}[operator]
        claimed = re.fullmatch(rf"{a} {re.escape(operator)} {b} = (-?\d+)\.", answer).group(1)
        return truth, int(claimed)
    if kind == "units":
        target, amount, source = re.fullmatch(r"How many (\w+) are in (\d+) (\w+)\?", question).groups()
        claimed = re.fullmatch(rf"{amount} {source} is (\d+) {target}\.", answer).group(1)
        return int(amount) * UNIT_FACTORS[source, target], int(claimed)
    if kind == "capitals":
        country = re.fullmatch(r"What is the capital of (.+)\?", question).group(1)
        claimed = re.fullmatch(rf"The capital of {country} is (.+)\.", answer).group(1)
        return {name: capital for name, capital, _, _ in CAPITALS}[country], claimed
    if kind == "elements":
        element = re.fullmatch(r"What is the chemical symbol for (\w+)\?", question).group(1)
        claimed = re.fullmatch(rf"The chemical symbol for {element} is (\w+)\.", answer).group(1)
        return dict(ELEMENTS)[element], claimed
    if kind == "opposites":
        word = re.fullmatch(r'What is the opposite of "(\w+)"\?', question).group(1)
        claimed = re.fullmatch(rf'The opposite of "{word}" is "(\w+)"\.', answer).group(1)
        return {word: opposite for word, opposite, _ in OPPOSITES}[word], claimed
    if kind == "letters":
        word = re.fullmatch(r'How many letters are in the word "(\w+)"\?', question).group(1)
        claimed = re.fullmatch(rf'The word "{word}" has (\d+) letters\.', answer).group(1)
        return len(word), int(claimed)
    raise AssertionError(f"unknown kind {kind}")


def _prompts(records):
    return {_text(record["prompt"]) for record in records}


# --------------------------------------------------------------------------------------------------------------


def test_generation_is_deterministic_and_the_seed_matters():
    assert generate_pairs(seed=0) == generate_pairs(seed=0)
    assert generate_pairs(seed=0) != generate_pairs(seed=1)


def test_a_few_hundred_pairs_of_every_kind_with_distinct_prompts():
    records = generate_pairs()
    counts = Counter(record["kind"] for record in records)
    assert set(counts) == set(KINDS) and min(counts.values()) >= 40
    assert 250 <= len(records) <= 400
    assert len(_prompts(records)) == len(records)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_every_chosen_is_right_and_every_rejected_is_wrong(seed):
    for record in generate_pairs(seed):
        truth, chosen_claim = _claimed_value(record, "chosen")
        _, rejected_claim = _claimed_value(record, "rejected")
        assert chosen_claim == truth, record
        assert rejected_claim != truth, record
        assert record["answer"] == str(truth)
        assert record["chosen"] != record["rejected"]


def test_the_tables_hold_known_facts():
    capitals = {country: capital for country, capital, _, _ in CAPITALS}
    assert {country: capitals[country] for country in SOME_CAPITALS} == SOME_CAPITALS
    assert {name: dict(ELEMENTS)[name] for name in SOME_SYMBOLS} == SOME_SYMBOLS
    assert len({word for word, _, _ in OPPOSITES}) == len(OPPOSITES)


def test_rejected_answers_are_plausible_slips():
    by_prompt = {_text(record["prompt"]): _text(record["rejected"]) for record in generate_pairs()}
    assert by_prompt["What is the capital of Australia?"] == "The capital of Australia is Sydney."
    assert by_prompt["What is the chemical symbol for gold?"] == "The chemical symbol for gold is Go."
    assert by_prompt['What is the opposite of "hot"?'] == 'The opposite of "hot" is "warm".'
    continents = {capital: continent for _, capital, continent, _ in CAPITALS}
    for country, _, continent, mistaken_city in CAPITALS:  # no famous city: a capital of the continent
        if mistaken_city is None:
            wrong = by_prompt[f"What is the capital of {country}?"].removeprefix(
                f"The capital of {country} is "
            )
            assert continents[wrong.removesuffix(".")] == continent


def test_the_split_is_stratified_and_shares_no_prompt():
    records = generate_pairs()
    train, test = train_test_split(records, test_fraction=0.3, seed=0)
    assert not _prompts(train) & _prompts(test)
    assert len(train) + len(test) == len(records)
    kinds = Counter(record["kind"] for record in records)
    test_kinds = Counter(record["kind"] for record in test)
    for kind, count in kinds.items():
        assert test_kinds[kind] == round(0.3 * count)
        assert any(record["kind"] == kind for record in train)
    assert train_test_split(records, seed=0) == (train, test)
    assert train_test_split(records, seed=1) != (train, test)


def test_records_sharing_a_prompt_stay_on_one_side():
    records = generate_pairs()[:60]
    doubled = records + [
        dict(record, rejected=[{"role": "assistant", "content": "I do not know."}]) for record in records
    ]
    train, test = train_test_split(doubled, test_fraction=0.5)
    assert not _prompts(train) & _prompts(test)
    assert len(test) % 2 == 0 and len(train) % 2 == 0


def test_a_kind_with_one_prompt_stays_in_train():
    records = [record for record in generate_pairs() if record["kind"] == "capitals"][:1]
    assert train_test_split(records) == (records, [])
    with pytest.raises(ValueError, match="test_fraction"):
        train_test_split(records, test_fraction=1.0)


def test_the_pairs_validate_as_conversational_with_kind_in_metadata():
    pair_set = pairs_from_records(generate_pairs())
    assert len(pair_set) == len(generate_pairs()) and pair_set.identical == 0 and pair_set.duplicates == 0
    assert all(pair.conversational and pair.metadata["kind"] in KINDS for pair in pair_set)


def test_write_demo_data_writes_jsonl_that_load_pairs_reads(tmp_path):
    train_path, test_path = write_demo_data(tmp_path / "data", seed=0)
    train, test = load_pairs(train_path), load_pairs(test_path)
    assert (train_path.name, test_path.name) == ("train.jsonl", "test.jsonl")
    assert len(train) + len(test) == len(generate_pairs()) and not train.dropped and not test.dropped
    assert {pair.metadata["kind"] for pair in train} == {pair.metadata["kind"] for pair in test} == set(KINDS)
    assert not {json.dumps(pair.prompt) for pair in train} & {json.dumps(pair.prompt) for pair in test}
    assert sorted(path.name for path in (tmp_path / "data").iterdir()) == ["test.jsonl", "train.jsonl"]


def test_write_demo_data_subsets_keep_every_kind(tmp_path):
    train_path, test_path = write_demo_data(tmp_path, seed=3, train_pairs=60, test_pairs=24)
    train, test = load_pairs(train_path), load_pairs(test_path)
    assert (len(train), len(test)) == (60, 24)
    assert Counter(pair.metadata["kind"] for pair in train) == {kind: 10 for kind in KINDS}
    assert Counter(pair.metadata["kind"] for pair in test) == {kind: 4 for kind in KINDS}
    assert write_demo_data(tmp_path / "again", seed=3, train_pairs=60, test_pairs=24) != (
        train_path,
        test_path,
    )
    assert (tmp_path / "again" / "train.jsonl").read_bytes() == train_path.read_bytes()


def test_write_demo_data_refuses_more_pairs_than_exist(tmp_path):
    with pytest.raises(ValueError, match="train_pairs must be between 1 and"):
        write_demo_data(tmp_path, train_pairs=10_000)
