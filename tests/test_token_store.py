"""Tests of mrpo.data.token_store: tokenized pairs in memory and on disk read back the same pairs."""

import pickle

import numpy as np
import pytest

from mrpo.data.token_store import (
    PairWriter,
    StoredPairs,
    TokenizedPair,
    TokenizedPairs,
    TokenizedSequence,
    pair_ids_of,
    sequence_at,
    sequence_lengths,
)
from mrpo.data.tokenization import ModelView, tokenize_for_models
from tiny_models import bpe_tokenizer, char_tokenizer, conversational_pairs, standard_pairs


def random_pairs(n: int, seed: int = 0, id_width: int = 16) -> list[TokenizedPair]:
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n):
        prompt = int(rng.integers(1, 20))
        sequences = [
            TokenizedSequence(
                tuple(int(t) for t in rng.integers(0, 70_000, prompt + int(rng.integers(1, 30)))), prompt
            )
            for _ in range(2)
        ]
        pairs.append(TokenizedPair(f"{i:0{id_width}x}", *sequences))
    return pairs


def write(directory, pairs) -> StoredPairs:
    writer = PairWriter(directory)
    for pair in pairs:
        writer.append(pair)
    return writer.finish()


def test_stored_pairs_read_back_what_was_written_across_flushes(tmp_path, monkeypatch):
    monkeypatch.setattr(PairWriter, "BLOCK_TOKENS", 50)  # a flush every few pairs: offsets must continue
    pairs = random_pairs(40)
    stored = write(tmp_path / "store", pairs)
    memory = TokenizedPairs(pairs)
    assert len(stored) == 40 and stored == pairs and memory == stored
    assert list(stored) == pairs and stored[-1] == pairs[-1] and stored[3:7] == pairs[3:7]
    assert isinstance(stored[0].chosen.input_ids, tuple) and isinstance(stored[0].chosen.input_ids[0], int)
    assert list(sequence_lengths(stored)) == list(sequence_lengths(memory))
    assert list(pair_ids_of(stored)) == [p.pair_id for p in pairs] == pair_ids_of(memory)
    for j in (0, 1, 17, 79):
        assert sequence_at(stored, j) == sequence_at(pairs, j)
    with pytest.raises(IndexError, match="out of range for 40 pairs"):
        stored[40]
    # Opened again from the directory alone: the same pairs.
    assert StoredPairs(tmp_path / "store") == pairs
    # The ids file is the only thing that grows with the tokens; the rest is 12 bytes a sequence.
    assert (tmp_path / "store" / "ids.i32").stat().st_size == 4 * sum(sequence_lengths(pairs))


def test_blocks_appended_whole_store_what_pair_by_pair_stores(tmp_path, monkeypatch):
    monkeypatch.setattr(PairWriter, "BLOCK_TOKENS", 50)  # flushes between and inside blocks
    pairs = random_pairs(40)
    by_pair = write(tmp_path / "by-pair", pairs)
    writer, memory = PairWriter(tmp_path / "by-block"), TokenizedPairs()
    for start in range(0, 40, 7):  # a worker process's blocks (tokenization's num_proc)
        block = TokenizedPairs(pairs[start : start + 7])
        writer.extend(block)
        memory.extend(block)
    by_block = writer.finish()
    assert by_block == pairs and memory == pairs and (memory.pair_tags() == by_pair.pair_tags()).all()
    for name in ("ids.i32", "ends.i64", "prompts.i32", "hashes.u64", "pair_ids.txt"):
        assert (tmp_path / "by-block" / name).read_bytes() == (tmp_path / "by-pair" / name).read_bytes()
    assert memory.nbytes == TokenizedPairs(pairs).nbytes
    with pytest.raises(ValueError, match="cannot be stored"):
        PairWriter(tmp_path / "bad").extend(
            TokenizedPairs([TokenizedPair("a\nb", pairs[0].chosen, pairs[0].rejected)])
        )


def test_stored_pairs_travel_to_a_data_loader_worker(tmp_path):
    pairs = random_pairs(5)
    stored = write(tmp_path / "store", pairs)
    assert stored[2] == pairs[2]  # opens the ids file
    copy = pickle.loads(pickle.dumps(stored))
    assert copy == pairs


def test_pair_ids_of_different_widths_and_an_empty_store(tmp_path):
    pairs = random_pairs(3)
    mixed = [
        TokenizedPair(pair_id, p.chosen, p.rejected)
        for pair_id, p in zip(["a", "bbbb", "cc"], pairs, strict=True)
    ]
    assert list(write(tmp_path / "mixed", mixed).pair_ids) == ["a", "bbbb", "cc"]
    empty = write(tmp_path / "empty", [])
    assert len(empty) == 0 and list(empty) == [] and list(empty.pair_ids) == []
    with pytest.raises(ValueError, match="ASCII without newlines"):
        PairWriter(tmp_path / "bad").append(TokenizedPair("a\nb", pairs[0].chosen, pairs[0].rejected))


def test_a_store_whose_files_disagree_is_refused(tmp_path):
    write(tmp_path / "store", random_pairs(4))
    ids = tmp_path / "store" / "ids.i32"
    ids.write_bytes(ids.read_bytes()[:-4])  # truncated: one token short
    with pytest.raises(ValueError, match="ids.i32 holds .* bytes, its offsets describe"):
        StoredPairs(tmp_path / "store")
    ids.unlink()
    with pytest.raises(FileNotFoundError):
        StoredPairs(tmp_path / "store")
    (tmp_path / "store" / "pair_ids.txt").write_text("only-one\n")
    with pytest.raises(ValueError, match="do not describe one set of pairs"):
        StoredPairs(tmp_path / "store")


def test_stored_pair_ids_convert_to_numbers_as_the_table_keys_them(tmp_path):
    from mrpo.data.pairs import compute_pair_id
    from mrpo.pair_table import _number, pair_numbers

    pairs = [
        TokenizedPair(compute_pair_id(f"p{i}", "c", "r"), p.chosen, p.rejected)
        for i, p in enumerate(random_pairs(50))
    ]
    ids = write(tmp_path / "store", pairs).pair_ids
    assert ids.numbers().tolist() == [_number(p.pair_id) for p in pairs] == pair_numbers(list(ids)).tolist()
    odd = write(tmp_path / "odd", random_pairs(3, id_width=5)).pair_ids
    assert odd.numbers() is None and len(pair_numbers(odd)) == 3


@pytest.mark.parametrize("make_pairs", [standard_pairs, conversational_pairs])
def test_tokenizing_to_disk_gives_the_pairs_tokenizing_in_memory_gives(tmp_path, make_pairs):
    shared = bpe_tokenizer()
    views = [
        ModelView(shared, name="policy"),
        ModelView(shared, name="initialising"),  # one tokenizer object: one storage for both
        ModelView(char_tokenizer(), name="char"),
    ]
    memory = tokenize_for_models(make_pairs(), views, max_length=[None, None, 40])
    disk = tokenize_for_models(
        make_pairs(), views, max_length=[None, None, 40], storage=lambda k: PairWriter(tmp_path / f"view-{k}")
    )
    assert disk.owners == memory.owners == [0, 0, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["view-0", "view-2"]
    assert disk.dropped == memory.dropped and disk.summary() == memory.summary()
    assert list(disk.pair_ids) == list(memory.pair_ids)
    for stored, in_memory in zip(disk.per_view, memory.per_view, strict=True):
        assert isinstance(stored, StoredPairs) and stored == in_memory
    assert disk.per_view[0] is disk.per_view[1]
