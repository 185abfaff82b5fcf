"""Tests of mrpo.batching: padded and packed rows (their log-probs are tests/test_logprobs.py's) and token-budget
micro-batches (the collator's use of them is tests/test_collator.py's)."""

import random

import pytest
import torch

from mrpo.batching import (
    bucket_length,
    forward_tokens,
    pack_sequences,
    pad_batch,
    token_budget_batches,
    token_budget_groups,
)
from mrpo.data.token_store import TokenizedSequence


def test_pad_batch_exact_tensors():
    sequences = [TokenizedSequence((5, 6, 7), 2), TokenizedSequence((8, 9), 1)]
    right = pad_batch(sequences, pad_token_id=0)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert right["completion_mask"].tolist() == [[0, 0, 1], [0, 1, 0]]
    left = pad_batch(sequences, pad_token_id=0, padding_side="left", pad_to_multiple_of=4)
    assert left["input_ids"].tolist() == [[0, 5, 6, 7], [0, 0, 8, 9]]
    assert left["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 1, 1]]
    assert left["completion_mask"].tolist() == [[0, 0, 0, 1], [0, 0, 0, 1]]


def test_pack_sequences_worked_example():
    packed = pack_sequences(
        [TokenizedSequence((5, 6, 7), 2), TokenizedSequence((8, 9), 1)], pad_to_multiple_of=4
    )
    assert packed["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert packed["completion_mask"].tolist() == [[0, 0, 1, 0, 1, 0, 0, 0]]
    assert packed["sequence_index"].tolist() == [[0, 0, 0, 1, 1, -1, -1, -1]]
    assert packed["prediction_positions"].tolist() == [[0, 0], [1, 3]]


# ---------------------------------------------------------------------------------------------------------------
# Token-budget micro-batches


def test_token_budget_groups_the_docstring_example():
    lengths = [(3, 4), (9, 10), (4, 2), (8, 8)]
    assert token_budget_groups(lengths, 40, padded=True) == [[1, 3], [0, 2]]
    # Packed, the cost is the total length: 19 + 16 = 35 fits 40, adding 7 would not; then 7 + 6.
    assert token_budget_groups(lengths, 40, padded=False) == [[1, 3], [0, 2]]
    assert token_budget_groups(lengths, 19, padded=False) == [[1], [3], [0, 2]]
    # Rounded up to multiples of 16, every pair alone costs 2 x 16 = 32 padded and any two cost 64.
    assert token_budget_groups(lengths, 40, padded=True, pad_to_multiple_of=16) == [[1], [3], [0], [2]]


def test_token_budget_groups_respect_the_budget_and_cover_every_pair_once():
    generator = torch.Generator().manual_seed(0)
    for padded in (True, False):
        for _ in range(50):
            n = int(torch.randint(1, 20, (1,), generator=generator))
            lengths = [
                tuple(int(x) for x in torch.randint(1, 60, (2,), generator=generator)) for _ in range(n)
            ]
            budget = int(torch.randint(1, 400, (1,), generator=generator))
            groups = token_budget_groups(lengths, budget, padded=padded)
            assert sorted(i for group in groups for i in group) == list(range(n))
            for group in groups:
                cost = forward_tokens([lengths[i] for i in group], padded=padded)
                assert (
                    cost <= budget or len(group) == 1
                )  # only a pair over the budget on its own may exceed it
            # Greedy: merging a group with the first pair of the next one would break the budget.
            for group, following in zip(groups, groups[1:], strict=False):
                merged = [lengths[i] for i in [*group, following[0]]]
                assert forward_tokens(merged, padded=padded) > budget


def test_token_budget_groups_refuse_a_budget_below_one():
    with pytest.raises(ValueError, match="budget"):
        token_budget_groups([(3, 4)], 0, padded=True)


def test_token_budget_batches_exact():
    assert token_budget_batches([3, 10, 4, 2, 9], batch_tokens=20) == [[1, 4], [2, 0, 3]]
    assert token_budget_batches([30, 5, 5], batch_tokens=10) == [[0], [1, 2]]
    assert token_budget_batches([], batch_tokens=10) == []


@pytest.mark.parametrize("seed", range(5))
def test_token_budget_batches_cover_every_index_within_budget(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 120) for _ in range(rng.randint(1, 300))]
    budget = rng.choice([50, 100, 256, 1000])
    batches = token_budget_batches(lengths, budget)
    flat = [index for batch in batches for index in batch]
    assert sorted(flat) == list(range(len(lengths)))
    for batch in batches:
        padded = len(batch) * max(lengths[i] for i in batch)
        assert padded <= budget or len(batch) == 1
    # Longest first, and greedy: no batch could have taken the next batch's first sequence.
    for batch in batches[:-1]:
        assert (len(batch) + 1) * max(lengths[i] for i in batch) > budget


def test_bucket_length_is_four_lengths_per_doubling_or_the_multiple():
    assert [bucket_length(n) for n in (1, 5, 8, 9, 11, 16, 17, 33, 100, 129, 1000, 1025)] == [
        1, 5, 8, 10, 12, 16, 20, 40, 112, 160, 1024, 1280,
    ]  # fmt: skip
    buckets = {bucket_length(n) for n in range(65, 129)}
    assert buckets == {80, 96, 112, 128}
    for n in range(1, 5000):
        assert n <= bucket_length(n) <= max(n, 1.25 * (n - 1))  # at most 25% padding
        assert bucket_length(bucket_length(n)) == bucket_length(n)  # a bucket is its own bucket
    assert bucket_length(100, 64) == 128 and bucket_length(100, 1) == 100


def test_bucketed_budget_groups_keep_the_budget_at_the_bucketed_length():
    rng = random.Random(1)
    lengths = [(rng.randint(3, 300), rng.randint(3, 300)) for _ in range(64)]
    for padded in (True, False):
        for budget in (200, 700, 2500):
            groups = token_budget_groups(lengths, budget, padded=padded, bucketed=True)
            assert sorted(i for group in groups for i in group) == list(range(len(lengths)))
            for group in groups:
                cost = forward_tokens([lengths[i] for i in group], padded=padded, bucketed=True)
                assert cost <= budget or len(group) == 1
