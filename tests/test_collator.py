"""PreferenceCollator / PreferenceDataset: the exact padded tensors of the documented example, and the errors."""

import pytest
import torch

from mrpo.collator import PreferenceCollator, PreferenceDataset
from mrpo.data.token_store import TokenizedPair, TokenizedSequence
from mrpo.errors import CollatorError


def worked_example() -> list[dict]:
    """The example of collator.py's module docstring."""
    return [
        {"pair_id": "a", "chosen_input_ids": [5, 6, 7], "chosen_prompt_length": 2,
         "rejected_input_ids": [5, 6, 8, 9], "rejected_prompt_length": 2,
         "reference_chosen_logps": [-1.0, -2.0], "reference_rejected_logps": [-3.0, -4.0]},
    ]  # fmt: skip


def as_lists(batch: dict) -> dict[str, list]:
    return {
        name: value.tolist() if isinstance(value, torch.Tensor) else value for name, value in batch.items()
    }


def test_worked_example_of_the_docstring():
    batch = PreferenceCollator(pad_token_id=0)(worked_example())
    assert as_lists(batch) == {
        "input_ids": [[5, 6, 7, 0], [5, 6, 8, 9]],
        "attention_mask": [[1, 1, 1, 0], [1, 1, 1, 1]],
        "completion_mask": [[0, 0, 1, 0], [0, 0, 1, 1]],
        "prediction_positions": [
            [0, 1, 1],
            [1, 1, 2],
        ],  # states (0,1), (1,1), (1,2) predict completion tokens
        "reference_chosen_logps": [[-1.0], [-2.0]],
        "reference_rejected_logps": [[-3.0], [-4.0]],
        "pair_ids": ["a"],
        "num_tokens": 7,  # 3 + 4 real tokens, the padding not counted
    }
    assert all(batch[name].dtype == torch.long for name in ("input_ids", "attention_mask", "completion_mask"))
    assert batch["reference_chosen_logps"].dtype == torch.float32


def test_two_pairs_left_padding_chosen_rows_first():
    examples = [
        *worked_example(),
        {"pair_id": "b", "chosen_input_ids": [2, 3], "chosen_prompt_length": 1,
         "rejected_input_ids": [2, 4, 4], "rejected_prompt_length": 1,
         "reference_chosen_logps": torch.tensor([-5.0, -6.0]), "reference_rejected_logps": [-7.0, -8.0]},
    ]  # fmt: skip
    batch = PreferenceCollator(pad_token_id=0, padding_side="left")(examples)
    assert as_lists(batch) == {
        # rows: chosen a, chosen b, rejected a, rejected b
        "input_ids": [[0, 5, 6, 7], [0, 0, 2, 3], [5, 6, 8, 9], [0, 2, 4, 4]],
        "attention_mask": [[0, 1, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]],
        "completion_mask": [[0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 1, 1], [0, 0, 1, 1]],
        "prediction_positions": [[0, 1, 2, 2, 3, 3], [2, 2, 1, 2, 1, 2]],
        "reference_chosen_logps": [[-1.0, -5.0], [-2.0, -6.0]],  # (K, B)
        "reference_rejected_logps": [[-3.0, -7.0], [-4.0, -8.0]],
        "pair_ids": ["a", "b"],
        "num_tokens": 12,  # 3 + 2 + 4 + 3
    }


def test_pad_to_multiple_of():
    batch = PreferenceCollator(pad_token_id=9, pad_to_multiple_of=8)(worked_example())
    assert batch["input_ids"].tolist() == [[5, 6, 7, 9, 9, 9, 9, 9], [5, 6, 8, 9, 9, 9, 9, 9]]
    assert batch["completion_mask"].tolist() == [[0, 0, 1, 0, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0, 0, 0]]


def test_dataset_items_collate_to_the_same_batch():
    pairs = [
        TokenizedPair("a", TokenizedSequence((5, 6, 7), 2), TokenizedSequence((5, 6, 8, 9), 2)),
        TokenizedPair("b", TokenizedSequence((2, 3), 1), TokenizedSequence((2, 4, 4), 1)),
    ]
    dataset = PreferenceDataset(
        pairs, torch.tensor([[-1.0, -5.0], [-2.0, -6.0]]), torch.tensor([[-3.0, -7.0], [-4.0, -8.0]])
    )
    assert len(dataset) == 2 and dataset.num_references == 2
    assert dataset[1]["pair_id"] == "b"
    batch = PreferenceCollator(pad_token_id=0)([dataset[0], dataset[1]])
    assert batch["reference_chosen_logps"].tolist() == [[-1.0, -5.0], [-2.0, -6.0]]
    assert batch["input_ids"].tolist()[1] == [2, 3, 0, 0]


def test_missing_reference_columns_are_named():
    example = {key: value for key, value in worked_example()[0].items() if not key.startswith("reference_")}
    with pytest.raises(CollatorError) as caught:
        PreferenceCollator(pad_token_id=0)([example])
    message = str(caught.value)
    assert "reference_chosen_logps" in message and "reference_rejected_logps" in message
    assert "pair a" in message and "mrpo precompute" in message


def test_missing_token_column_is_named_without_the_cache_hint():
    example = dict(worked_example()[0])
    del example["rejected_prompt_length"]
    with pytest.raises(CollatorError, match="lacks rejected_prompt_length") as caught:
        PreferenceCollator(pad_token_id=0)([example])
    assert "precompute" not in str(caught.value)


def test_examples_with_different_numbers_of_references():
    other = dict(worked_example()[0], reference_chosen_logps=[-1.0], reference_rejected_logps=[-3.0])
    with pytest.raises(CollatorError, match=r"different numbers of references: \[1, 2\]"):
        PreferenceCollator(pad_token_id=0)([worked_example()[0], other])


def test_empty_batch():
    with pytest.raises(CollatorError, match="empty batch"):
        PreferenceCollator(pad_token_id=0)([])


@pytest.mark.parametrize(
    ("chosen_shape", "rejected_shape"),
    [((1, 3), (1, 2)), ((2, 2), (2, 2)), ((1, 2), (2, 2))],
    ids=["rejected-short", "both-wrong-N", "different-K"],
)
def test_dataset_rejects_reference_columns_of_the_wrong_shape(chosen_shape, rejected_shape):
    pairs = [
        TokenizedPair(name, TokenizedSequence((1, 2), 1), TokenizedSequence((1, 3), 1))
        for name in ("a", "b", "c")
    ]
    with pytest.raises(ValueError, match=r"expected \(K, 3\) each"):
        PreferenceDataset(pairs, torch.zeros(chosen_shape), torch.zeros(rejected_shape))


# ---------------------------------------------------------------------------------------------------------------
# Token-budget micro-batches


def _pairs_of_lengths(lengths):
    return [
        {"pair_id": str(i), "chosen_input_ids": list(range(1, c + 1)), "chosen_prompt_length": 1,
         "rejected_input_ids": list(range(2, r + 2)), "rejected_prompt_length": 1,
         "reference_chosen_logps": [-1.0 - i], "reference_rejected_logps": [-2.0 - i]}
        for i, (c, r) in enumerate(lengths)
    ]  # fmt: skip


def test_collator_splits_over_the_budget_and_weights_each_micro_batch_by_its_pairs():
    examples = _pairs_of_lengths([(3, 4), (9, 10), (4, 2), (8, 8)])
    batch = PreferenceCollator(pad_token_id=0, micro_batch_tokens=40)(examples)
    assert list(batch) == ["micro_batches"]
    first, second = batch["micro_batches"]
    assert first["input_ids"].shape == (4, 10) and second["input_ids"].shape == (4, 4)
    assert first["reference_chosen_logps"].tolist() == [[-2.0, -4.0]]  # pairs 1 and 3
    assert second["reference_chosen_logps"].tolist() == [[-1.0, -3.0]]  # pairs 0 and 2
    assert first["loss_weight"] == second["loss_weight"] == 0.5
    # Each micro-batch is exactly what the collator makes of its pairs alone.
    alone = PreferenceCollator(pad_token_id=0)([examples[1], examples[3]])
    assert as_lists(alone) == {k: v for k, v in as_lists(first).items() if k != "loss_weight"}
    assert first["pair_ids"] == ["1", "3"] and second["pair_ids"] == ["0", "2"]


def test_collator_within_the_budget_returns_one_batch_padded_to_its_bucket():
    examples = _pairs_of_lengths([(3, 4), (9, 10)])
    for padding_free, bucket in ((False, 10), (True, 28)):  # the longest 10 is a bucket; a packed 26 is not
        budgeted = PreferenceCollator(pad_token_id=0, padding_free=padding_free, micro_batch_tokens=1000)(
            examples
        )
        plain = PreferenceCollator(pad_token_id=0, padding_free=padding_free, pad_to_multiple_of=bucket)(
            examples
        )
        assert as_lists(budgeted) == as_lists(plain)
        assert budgeted["input_ids"].shape[-1] == bucket


def _ultrafeedback_like_lengths(pairs: int, seed: int = 0) -> list[tuple[int, int]]:
    """The GPU bench's lengths (bench/train_vs_trl.py's make_rows): prompt ~ lognormal median 150 tokens,
    completions ~ median 250, cut at 1024."""
    import math
    import random

    rng = random.Random(seed)

    def length(median: float, sigma: float, cap: int) -> int:
        return min(int(rng.lognormvariate(math.log(median), sigma)) + 8, cap)

    lengths = []
    for _ in range(pairs):
        prompt = length(150, 0.8, 600)
        lengths.append(tuple(min(prompt + length(250, 0.6, 700) + 1, 1024) for _ in range(2)))
    return lengths


def _micro_batch_shapes(collator: PreferenceCollator, lengths, pairs_per_step: int) -> list[tuple[int, ...]]:
    shapes = []
    for start in range(0, len(lengths), pairs_per_step):
        batch = collator(_pairs_of_lengths(lengths[start : start + pairs_per_step]))
        shapes += [tuple(b["input_ids"].shape) for b in batch.get("micro_batches", [batch])]
    return shapes


@pytest.mark.parametrize("padding_free", [False, True])
def test_bucketed_micro_batches_repeat_their_shapes(padding_free):
    """The bench's setting (8 pairs a step, a budget of 4 x the longest pair, 60 steps): exact lengths make a new
    shape at nearly every micro-batch; the default buckets a few, pad_to_multiple_of (the multiples the compile
    warning suggests: 256 padded, a quarter of the budget packed) fewer still."""
    lengths = _ultrafeedback_like_lengths(480)
    budget = 4 * max(max(pair) for pair in lengths)
    suggested = budget // 4 if padding_free else 256
    counts = {}
    for multiple in (1, None, suggested):
        collator = PreferenceCollator(
            pad_token_id=0, padding_free=padding_free, micro_batch_tokens=budget, pad_to_multiple_of=multiple
        )
        shapes = _micro_batch_shapes(collator, lengths, 8)
        counts[multiple] = len(set(shapes))
        for shape in shapes:  # the bucketed forward stays within the budget (no pair here is over it alone)
            assert shape[0] * shape[1] <= budget
    exact, default, multiple = counts[1], counts[None], counts[suggested]
    assert exact > 100 and default <= 20 and multiple <= 8, counts
    print(f"distinct micro-batch shapes, {'packed' if padding_free else 'padded'}: {counts}")


@pytest.mark.parametrize("pad_to_multiple_of", [None, 8])
@pytest.mark.parametrize("padding_free", [False, True])
def test_bucketed_forward_tokens_is_the_size_of_the_budgeted_batch(padding_free, pad_to_multiple_of):
    from mrpo.batching import forward_tokens

    lengths = [(3, 4), (19, 10), (4, 2)]
    batch = PreferenceCollator(
        pad_token_id=0,
        padding_free=padding_free,
        pad_to_multiple_of=pad_to_multiple_of,
        micro_batch_tokens=1000,
    )(_pairs_of_lengths(lengths))
    expected = forward_tokens(
        lengths, padded=not padding_free, pad_to_multiple_of=pad_to_multiple_of, bucketed=True
    )
    assert batch["input_ids"].numel() == expected


@pytest.mark.parametrize("pad_to_multiple_of", [None, 8])
@pytest.mark.parametrize("padding_free", [False, True])
def test_forward_tokens_is_the_size_of_the_batch_the_collator_builds(padding_free, pad_to_multiple_of):
    from mrpo.batching import forward_tokens

    lengths = [(3, 4), (9, 10), (4, 2)]
    batch = PreferenceCollator(
        pad_token_id=0, padding_free=padding_free, pad_to_multiple_of=pad_to_multiple_of
    )(_pairs_of_lengths(lengths))
    expected = forward_tokens(lengths, padded=not padding_free, pad_to_multiple_of=pad_to_multiple_of)
    assert batch["input_ids"].numel() == expected
