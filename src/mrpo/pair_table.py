"""A table of numbers keyed by pair id, held as numpy arrays: what a reference store keeps in memory.

A pair id (``pairs.compute_pair_id``) is 16 hex digits, i.e. one 64-bit number; the table keeps the numbers sorted
with one row of values each, so an entry costs 8 bytes of key plus its values (16 bytes for a reference store's
chosen/rejected log-prob and token counts in float32) instead of ~300 for a Python dict of string keys and tuples, and a
million lookups are one ``searchsorted``. Ids of another form (hand-made ids in tests and scripts) are mapped to
64 bits by sha256.

Each row may carry a 64-bit tag beside its key (a reference store's: a checksum of the tokens the row was computed
from, ``token_store.pair_token_tags``); a lookup that gives tags finds only rows whose tag matches, so a row made
from other tokens reads as missing (8 bytes more an entry).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

_HEX = frozenset("0123456789abcdef")


def pair_numbers(pair_ids: Sequence[str]) -> np.ndarray:
    """The pair ids as uint64 numbers, in order (without a Python loop for stored ids, ``PairIds.numbers``)."""
    fast = pair_ids.numbers() if hasattr(pair_ids, "numbers") else None
    if fast is not None:
        return fast
    joined = "".join(pair_ids)
    if joined == joined.lower() and all(len(pair_id) == 16 for pair_id in pair_ids):
        try:  # all 16 lowercase hex digits (the usual case): one conversion for all
            raw = bytes.fromhex(joined)
        except ValueError:
            raw = b""
        if len(raw) == 8 * len(pair_ids):  # fromhex skips whitespace: a shorter result is not ids
            return np.frombuffer(raw, dtype=">u8").astype(np.uint64)
    numbers = np.empty(len(pair_ids), dtype=np.uint64)
    for i, pair_id in enumerate(pair_ids):
        numbers[i] = _number(pair_id)
    return numbers


def _number(pair_id: str) -> int:
    if len(pair_id) == 16 and _HEX.issuperset(pair_id):
        return int(pair_id, 16)
    return int.from_bytes(hashlib.sha256(pair_id.encode()).digest()[:8], "big")


class PairTable:
    """Rows of ``width`` numbers of one ``dtype`` keyed by pair id; a key added again replaces its row.

    Rows are added in chunks (``add``) and merged into the sorted arrays on the next lookup.
    """

    def __init__(self, width: int, dtype: np.dtype | str = np.float64):
        self.width, self.dtype = width, np.dtype(dtype)
        self._keys = np.empty(0, dtype=np.uint64)
        self._tags = np.empty(0, dtype=np.uint64)
        self._rows = np.empty((0, width), dtype=self.dtype)
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, pair_ids: Sequence[str], rows: np.ndarray, tags: np.ndarray | None = None) -> None:
        """Add rows (``tags``: one uint64 a row; zero when not given)."""
        rows = np.asarray(rows, dtype=self.dtype).reshape(len(pair_ids), self.width)
        tags = np.zeros(len(pair_ids), np.uint64) if tags is None else np.asarray(tags, dtype=np.uint64)
        if tags.shape != (len(pair_ids),):
            raise ValueError(f"{len(pair_ids)} pair ids but {tags.shape} tags")
        self._pending.append((pair_numbers(pair_ids), rows, tags))

    def clear(self) -> None:
        self.__init__(self.width, self.dtype)

    def _merge(self) -> None:
        if not self._pending:
            return
        keys = np.concatenate([self._keys, *(k for k, _, _ in self._pending)])
        rows = np.concatenate([self._rows, *(r for _, r, _ in self._pending)])
        tags = np.concatenate([self._tags, *(t for _, _, t in self._pending)])
        self._pending = []
        # The last row written for a key wins: unique over the reversed arrays keeps each key's last occurrence.
        unique, last = np.unique(keys[::-1], return_index=True)
        self._keys, self._rows, self._tags = unique, rows[::-1][last], tags[::-1][last]

    def positions(self, pair_ids: Sequence[str] | np.ndarray, tags: np.ndarray | None = None) -> np.ndarray:
        """Each id's row index, -1 where the table has no row for it (or, with ``tags``, none with that tag)."""
        self._merge()
        numbers = pair_ids if isinstance(pair_ids, np.ndarray) else pair_numbers(pair_ids)
        if numbers.dtype != np.uint64:
            raise TypeError(f"pair numbers must be uint64 (from pair_numbers), got {numbers.dtype}")
        at = np.searchsorted(self._keys, numbers)
        found = at < len(self._keys)
        found[found] = self._keys[at[found]] == numbers[found]
        if tags is not None:
            found[found] = self._tags[at[found]] == np.asarray(tags, dtype=np.uint64)[found]
        return np.where(found, at, -1)

    def rows(self, positions: np.ndarray) -> np.ndarray:
        """The rows at ``positions`` (all of them present)."""
        self._merge()
        return self._rows[positions]

    def missing(self, pair_ids: Sequence[str], tags: np.ndarray | None = None) -> list[str]:
        """The ids without a row (with ``tags``: without a row of that tag), in order."""
        absent = np.flatnonzero(self.positions(pair_ids, tags) < 0)
        return [pair_ids[i] for i in absent]

    def discard(self, pair_id: str) -> None:
        """Remove one id's row (for tests that damage a store)."""
        self._merge()
        keep = self._keys != _number(pair_id)
        self._keys, self._rows, self._tags = self._keys[keep], self._rows[keep], self._tags[keep]

    def __contains__(self, pair_id: str) -> bool:
        return bool(self.positions([pair_id])[0] >= 0)

    def __getitem__(self, pair_id: str) -> tuple:
        (at,) = self.positions([pair_id])
        if at < 0:
            raise KeyError(pair_id)
        return tuple(self._rows[at].tolist())

    def __len__(self) -> int:
        self._merge()
        return len(self._keys)
