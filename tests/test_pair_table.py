"""Tests of mrpo.pair_table: rows keyed by pair id, as a dict would hold them."""

import numpy as np
import pytest

from mrpo.data.pairs import compute_pair_id
from mrpo.pair_table import PairTable, pair_numbers


def test_rows_are_found_by_id_and_the_last_row_written_for_an_id_wins():
    ids = [compute_pair_id(f"p{i}", "c", "r") for i in range(1000)]
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(1000, 4))
    table, expected = PairTable(4), {}
    for start in range(0, 1000, 300):  # chunks, as shards arrive
        table.add(ids[start : start + 300], rows[start : start + 300])
        expected.update(
            zip(ids[start : start + 300], map(tuple, rows[start : start + 300].tolist()), strict=True)
        )
    table.add(ids[:10], rows[:10] + 1)  # a shard written again for the same pairs
    expected.update(zip(ids[:10], map(tuple, (rows[:10] + 1).tolist()), strict=True))
    assert len(table) == 1000
    assert all(table[pair_id] == expected[pair_id] for pair_id in ids)
    other = compute_pair_id("absent", "c", "r")
    order = [ids[5], other, ids[999], ids[5]]
    positions = table.positions(order)
    assert positions[1] == -1 and (positions[[0, 2, 3]] >= 0).all()
    assert table.rows(positions[[0, 2]]).tolist() == [list(expected[ids[5]]), list(expected[ids[999]])]
    assert table.missing(order) == [other] and other not in table and ids[7] in table
    with pytest.raises(KeyError):
        table[other]
    table.discard(ids[7])
    assert ids[7] not in table and len(table) == 999


def test_ids_of_other_forms_are_keyed_by_their_hash():
    table = PairTable(2)
    table.add(["a", "b", "0123456789abcdef"], np.array([[1, 2], [3, 4], [5, 6]]))
    assert table["b"] == (3.0, 4.0) and table["0123456789abcdef"] == (5.0, 6.0)
    assert table.missing(["c", "a"]) == ["c"]
    assert pair_numbers(["0123456789abcdef"]).tolist() == [0x0123456789ABCDEF]
    assert len(PairTable(2)) == 0 and PairTable(2).positions([]).shape == (0,)


def test_the_fast_conversion_of_ids_agrees_with_one_by_one():
    from mrpo.pair_table import _number

    for ids in (
        ["0123456789abcdef", "ffffffffffffffff", "0000000000000001"],
        ["0123456789abcdeZ"],  # not hex
        ["0123456789ABCDEF"],  # uppercase: not an id compute_pair_id makes, hashed
        ["01234567 9abcdef", "0123456789abcdef"],  # bytes.fromhex would skip the space
        ["a", "b" * 31],  # 32 characters in all, not 16 each
        [],
    ):
        assert pair_numbers(ids).tolist() == [_number(pair_id) for pair_id in ids], ids
