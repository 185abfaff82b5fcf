"""Tests of mrpo.batching: padded and packed rows, exact tensors (their log-probs are tests/test_logprobs.py's)."""

from mrpo.batching import pack_sequences, pad_batch
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
