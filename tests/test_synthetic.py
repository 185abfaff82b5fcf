"""Fast checks of the synthetic world of experiments/synthetic.py (issue 7): construction and pretraining."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "synthetic.py"


@pytest.fixture(scope="module")
def synthetic():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        spec = importlib.util.spec_from_file_location("synthetic_world", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["synthetic_world"] = module  # dataclasses look their module up by name
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(SCRIPT.parent))
        sys.modules.pop("synthetic_world", None)


@pytest.fixture(scope="module")
def world(synthetic):
    return synthetic.build_world(0)


def test_fact_sets_are_disjoint_by_entity_and_complete(synthetic, world):
    entities = {s: {f.entity for f in world.facts if f.fact_set == s} for s in synthetic.SETS}
    assert entities["A"].isdisjoint(entities["B"])
    assert entities["A"].isdisjoint(entities["C"])
    assert entities["B"].isdisjoint(entities["C"])
    settings = synthetic.WorldSettings()
    for fact_set in synthetic.SETS:
        assert len(entities[fact_set]) == settings.entities_per_set
    # one value per (entity, relation), every value from its relation's list
    keys = [(f.entity, f.relation) for f in world.facts]
    assert len(keys) == len(set(keys)) == 3 * settings.entities_per_set * len(synthetic.RELATIONS)
    assert all(f.value in synthetic.RELATIONS[f.relation] for f in world.facts)
    # entity names never collide with template words or values
    vocabulary = world.vocabulary()
    assert len(vocabulary) == len(set(vocabulary))


def test_pairs_are_verifiable_and_split_by_fact(synthetic, world):
    truth = {f.prompt: f for f in world.facts}
    assert len(truth) == len(world.facts)  # a prompt names exactly one fact
    for pair in world.train_pairs:
        fact = truth[pair["prompt"]]
        assert pair["chosen"].strip() == fact.value
        assert pair["rejected"].strip() != fact.value
        assert pair["rejected"].strip() in synthetic.RELATIONS[fact.relation]
        assert pair["kind"] == fact.fact_set
    train = {f.prompt for f in world.train_facts}
    test = {f.prompt for f in world.test_facts}
    assert train.isdisjoint(test)
    assert train | test == set(truth)
    assert {p["prompt"] for p in world.train_pairs} == train
    settings = synthetic.WorldSettings()
    for fact_set in synthetic.SETS:
        assert sum(f.fact_set == fact_set for f in world.train_facts) == settings.train_facts_per_set


def test_world_is_seeded(synthetic):
    assert synthetic.build_world(3).train_pairs == synthetic.build_world(3).train_pairs
    assert synthetic.build_world(3).facts != synthetic.build_world(4).facts


def test_pairs_load_through_mrpo_and_tokenize_to_one_word_answers(synthetic, world):
    from mrpo.data.sources import pairs_from_records
    from mrpo.data.tokenization import ModelView

    pairs = pairs_from_records(world.train_pairs)
    assert len(pairs) == len(world.train_pairs)
    tokenizer = synthetic.make_tokenizer(world)
    view = ModelView(tokenizer)
    for pair in list(pairs)[:5]:
        tokenized = view.tokenize(pair)
        for sequence in (tokenized.chosen, tokenized.rejected):
            # prompt (5 words) + the answer word + EOS, no unknown word anywhere
            assert sequence.prompt_length == 5
            assert len(sequence.input_ids) == 7
            assert sequence.input_ids[-1] == tokenizer.eos_token_id
            assert tokenizer.unk_token_id not in sequence.input_ids


def test_score_values_matches_mrpo_sequence_logps(synthetic, world):
    from mrpo.data.sources import pairs_from_records
    from mrpo.data.tokenization import ModelView
    from mrpo.references import score_pairs

    settings = synthetic.WorldSettings(hidden=16, layers=1)
    tokenizer = synthetic.make_tokenizer(world)
    model = synthetic.make_model(len(tokenizer), settings, seed=0).eval()
    records = world.train_pairs[:4]
    pairs = list(pairs_from_records(records))
    view = ModelView(tokenizer)
    logps, _ = score_pairs(model, view, [view.tokenize(p) for p in pairs], 4096, lambda _: None)
    facts = {f.prompt: f for f in world.facts}
    rows = [facts[r["prompt"]] for r in records]
    mine = synthetic.score_values(model, tokenizer, rows)
    for i, (record, fact) in enumerate(zip(records, rows, strict=True)):
        values = synthetic.RELATIONS[fact.relation]
        assert mine[i, values.index(record["chosen"].strip())] == pytest.approx(float(logps[i, 0]), abs=1e-4)
        assert mine[i, values.index(record["rejected"].strip())] == pytest.approx(
            float(logps[i, 1]), abs=1e-4
        )


def test_pretraining_teaches_model_a_its_own_facts_only(synthetic, world):
    settings = synthetic.WorldSettings(hidden=32, layers=1, pretrain_steps=150, pretrain_lr=1e-2)
    model_a, tokenizer, _ = synthetic.pretrain(world, ["A"], settings, seed=0)
    random_model = synthetic.make_model(len(tokenizer), settings, seed=0).eval()
    trained = synthetic.evaluate_world(model_a, tokenizer, world)
    untrained = synthetic.evaluate_world(random_model, tokenizer, world)
    assert trained["A"]["train"]["pairwise"] > 0.9
    assert trained["A"]["train"]["pairwise"] > untrained["A"]["train"]["pairwise"] + 0.2
    # it has never seen B or C: near chance there (0.5 pairwise), far below its own set
    for fact_set in ("B", "C"):
        assert trained[fact_set]["heldout"]["pairwise"] < 0.75


def test_noisy_arm_swaps_a_third_of_each_set_and_nothing_else(synthetic, world):
    assert len(world.noisy_pairs) == len(world.train_pairs)
    for fact_set in synthetic.SETS:
        clean = [p for p in world.train_pairs if p["kind"] == fact_set]
        noisy = [p for p in world.noisy_pairs if p["kind"] == fact_set]
        assert sum(p["flipped"] for p in noisy) == round(len(clean) / 3)
        for before, after in zip(clean, noisy, strict=True):
            assert before["prompt"] == after["prompt"]
            if after["flipped"]:
                assert (after["chosen"], after["rejected"]) == (before["rejected"], before["chosen"])
            else:
                assert (after["chosen"], after["rejected"]) == (before["chosen"], before["rejected"])
