"""Where tokenized pairs live: flat int32 arrays in memory (``TokenizedPairs``) or in files on disk
(``StoredPairs``), read one pair or one sequence at a time.

A token costs 4 bytes in either; in a tuple of Python ints it costs about 36 (a pointer and, above 256, an int
object), which at real data sizes is gigabytes per model view. ``TokenizedPair`` objects are built when an item is
read and not kept. Sequence ``2 i`` is pair i's chosen answer, ``2 i + 1`` its rejected one.

On disk a store is a directory of five files, written by ``PairWriter`` while pairs are tokenized:

    ids.i32           every sequence's token ids, back to back (int32)
    ends.i64          where each of the 2N sequences ends in ids.i32 (int64)
    prompts.i32       each sequence's prompt length (int32)
    hashes.u64        each sequence's checksum (``sequence_hash``: its prompt length and ids, 64 bits)
    pair_ids.txt      the N pair ids, one a line

``StoredPairs`` keeps only the ends, the prompt lengths, the checksums (20 bytes a sequence) and the pair ids (as
fixed-width bytes) in memory, and reads each sequence's ids with one positioned read (``os.pread``), so a process
holds the pairs it is working on, not the data set. Every sequence read is checked against its checksum (one
blake2b of its bytes, ~1 µs a KB), so damage to ids.i32 or ends.i64 after the build is a ``CacheError`` at the
read, never other tokens used silently. The same checksums, combined per pair (``pair_token_tags``), key the
reference stores' entries on the exact tokens they scored. Positioned reads rather than a memory map: a map's pages, once read, count in the
process's resident memory until the kernel needs them back, so a pass over a 10 GB store would look like (and on a
crowded node, behave like) 10 GB held.
"""

from __future__ import annotations

import hashlib
import os
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import overload

import numpy as np

from mrpo.errors import CacheError

IDS_FILE, ENDS_FILE, PROMPTS_FILE, PAIR_IDS_FILE = "ids.i32", "ends.i64", "prompts.i32", "pair_ids.txt"
HASHES_FILE = "hashes.u64"
STORE_FILES = (IDS_FILE, ENDS_FILE, PROMPTS_FILE, HASHES_FILE, PAIR_IDS_FILE)

_REJECTED_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd: multiplying by it is a bijection of 64-bit numbers


def sequence_hash(ids: bytes | memoryview, prompt_length: int) -> int:
    """A sequence's 64-bit checksum: blake2b of its prompt length and its ids as int32 bytes (in the machine's
    byte order, as ids.i32 holds them)."""
    digest = hashlib.blake2b(prompt_length.to_bytes(4, "little", signed=True), digest_size=8)
    digest.update(ids)
    return int.from_bytes(digest.digest(), "little")


def _ids_bytes(input_ids: Sequence[int]) -> bytes:
    return np.asarray(input_ids, dtype=np.int32).tobytes()


def combine_pair_tags(sequence_hashes: np.ndarray) -> np.ndarray:
    """One 64-bit tag a pair from its 2N sequence checksums (chosen, rejected, ...): it changes when either
    sequence's tokens do, and swapping chosen and rejected changes it too."""
    hashes = np.asarray(sequence_hashes, dtype=np.uint64)
    return hashes[0::2] ^ (hashes[1::2] * _REJECTED_MIX)


@dataclass(frozen=True)
class TokenizedSequence:
    """Token ids of prompt + completion for one model; the tokens at positions >= ``prompt_length`` are the
    completion, whose log-probs are summed."""

    input_ids: tuple[int, ...]
    prompt_length: int

    @property
    def completion_length(self) -> int:
        return len(self.input_ids) - self.prompt_length


@dataclass(frozen=True)
class TokenizedPair:
    """The chosen and rejected sequences of one pair, tokenized for one model."""

    pair_id: str
    chosen: TokenizedSequence
    rejected: TokenizedSequence


class _FlatPairs(Sequence[TokenizedPair]):
    """What the in-memory and the on-disk stores share: reading pairs and sequences by index."""

    _ends: Sequence[int]
    _prompt_lengths: Sequence[int]
    _hashes: Sequence[int]

    @property
    def pair_ids(self) -> Sequence[str]:
        raise NotImplementedError

    def _ids_between(self, start: int, end: int) -> tuple[int, ...]:
        raise NotImplementedError

    def sequence_lengths(self) -> np.ndarray:
        """Lengths of all 2N sequences (chosen, rejected, chosen, ...), without building any pair."""
        return np.diff(np.asarray(self._ends, dtype=np.int64), prepend=0)

    def sequence(self, j: int) -> TokenizedSequence:
        start = int(self._ends[j - 1]) if j else 0
        return TokenizedSequence(self._ids_between(start, int(self._ends[j])), int(self._prompt_lengths[j]))

    def pair_tags(self) -> np.ndarray:
        """Each pair's 64-bit tag of its tokens (``combine_pair_tags``), from the checksums kept at the write."""
        return combine_pair_tags(np.asarray(self._hashes, dtype=np.uint64))

    def __len__(self) -> int:
        return len(self._ends) // 2

    @overload
    def __getitem__(self, index: int) -> TokenizedPair: ...
    @overload
    def __getitem__(self, index: slice) -> list[TokenizedPair]: ...
    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"pair index {index} out of range for {len(self)} pairs")
        return TokenizedPair(self.pair_ids[index], self.sequence(2 * index), self.sequence(2 * index + 1))

    def __iter__(self) -> Iterator[TokenizedPair]:
        for index in range(len(self)):
            yield self[index]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]


class TokenizedPairs(_FlatPairs):
    """Pairs tokenized for one model, in memory: every sequence's ids in one int32 array, with offsets."""

    def __init__(self, pairs: Iterable[TokenizedPair] = ()):
        self._ids = array("i")
        self._ends = array("q")
        self._prompt_lengths = array("i")
        self._hashes = array("Q")
        self._pair_ids: list[str] = []
        for pair in pairs:
            self.append(pair)

    def append(self, pair: TokenizedPair) -> None:
        for sequence in (pair.chosen, pair.rejected):
            start = len(self._ids)
            self._ids.extend(sequence.input_ids)
            self._ends.append(len(self._ids))
            self._prompt_lengths.append(sequence.prompt_length)
            self._hashes.append(sequence_hash(_native_ids(self._ids, start), sequence.prompt_length))
        self._pair_ids.append(pair.pair_id)

    def extend(self, pairs: TokenizedPairs) -> None:
        """Append every pair of ``pairs`` (a block tokenized elsewhere), its checksums as they were computed."""
        _extend_flat(self, pairs, offset=len(self._ids))
        self._pair_ids.extend(pairs.pair_ids)

    def finish(self) -> TokenizedPairs:
        """Nothing to flush in memory (``PairWriter.finish`` returns the stored pairs)."""
        return self

    @property
    def pair_ids(self) -> list[str]:
        return self._pair_ids

    @property
    def nbytes(self) -> int:
        """Bytes held by the token arrays (the pair ids not counted)."""
        return sum(a.itemsize * len(a) for a in (self._ids, self._ends, self._prompt_lengths, self._hashes))

    def _ids_between(self, start: int, end: int) -> tuple[int, ...]:
        return tuple(self._ids[start:end])

    def __repr__(self) -> str:
        return f"TokenizedPairs({len(self)} pairs, {len(self._ids)} tokens)"


def _extend_flat(into: TokenizedPairs | PairWriter, pairs: TokenizedPairs, offset: int) -> None:
    """Append the arrays of ``pairs`` to those of ``into``, its sequence ends moved by ``offset`` tokens."""
    into._ids.extend(pairs._ids)
    into._ends.frombytes((np.frombuffer(pairs._ends, dtype=np.int64) + offset).tobytes())
    into._prompt_lengths.extend(pairs._prompt_lengths)
    into._hashes.extend(pairs._hashes)


def _native_ids(ids: array, start: int) -> memoryview:
    """The int32 bytes of ``ids[start:]``, as written to ids.i32 and read back."""
    return memoryview(ids)[start:]


class PairIds(Sequence[str]):
    """Pair ids held as one fixed-width bytes array (16 bytes each for the ids ``compute_pair_id`` makes, instead
    of ~70 for a Python string in a list); a ``str`` is made when one is read."""

    def __init__(self, ids: np.ndarray):
        self._ids = ids

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [item.decode("ascii") for item in self._ids[index]]
        return self._ids[index].decode("ascii")

    def __iter__(self) -> Iterator[str]:
        for item in self._ids:
            yield item.decode("ascii")

    def numbers(self) -> np.ndarray | None:
        """The ids as uint64 numbers when all are 16 hex digits (the ids ``compute_pair_id`` makes), else None."""
        if self._ids.dtype != np.dtype("S16") or not len(self._ids):
            return None
        try:
            raw = bytes.fromhex(self._ids.tobytes().decode("ascii"))
        except ValueError:
            return None
        return np.frombuffer(raw, dtype=">u8").astype(np.uint64)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"PairIds({len(self)} ids)"


class StoredPairs(_FlatPairs):
    """Pairs tokenized for one model, read from a directory written by ``PairWriter`` (see the module docstring).

    ``remedy`` ends the message of a damaged read (what the owner of the directory advises: the tokenized cache
    says which entry to delete).
    """

    def __init__(self, directory: str | os.PathLike, *, remedy: str = ""):
        self.directory = Path(directory)
        self.remedy = remedy or f"delete {self.directory} and write it again"
        self._ends = np.fromfile(self.directory / ENDS_FILE, dtype=np.int64)
        self._prompt_lengths = np.fromfile(self.directory / PROMPTS_FILE, dtype=np.int32)
        self._hashes = np.fromfile(self.directory / HASHES_FILE, dtype=np.uint64)
        self._pair_ids = PairIds(_read_pair_ids(self.directory / PAIR_IDS_FILE, self.remedy))
        if not (len(self._ends) == len(self._prompt_lengths) == len(self._hashes) == 2 * len(self._pair_ids)):
            raise ValueError(
                f"{self.directory}: {len(self._ends)} sequence ends, {len(self._prompt_lengths)} prompt lengths, "
                f"{len(self._hashes)} checksums and {len(self._pair_ids)} pair ids do not describe one set of pairs"
            )
        tokens = int(self._ends[-1]) if len(self._ends) else 0
        size = (self.directory / IDS_FILE).stat().st_size  # a missing file raises here, not at the first read
        decreasing = len(self._ends) and (self._ends[0] < 0 or (self._ends[1:] < self._ends[:-1]).any())
        if size != 4 * tokens or decreasing:
            raise ValueError(
                f"{self.directory}: {IDS_FILE} holds {size} bytes, its offsets describe {4 * tokens}"
            )
        self._file = os.open(self.directory / IDS_FILE, os.O_RDONLY)

    @property
    def pair_ids(self) -> PairIds:
        return self._pair_ids

    def sequence(self, j: int) -> TokenizedSequence:
        start, end = (int(self._ends[j - 1]) if j else 0), int(self._ends[j])
        data = self._read(start, end)
        prompt_length = int(self._prompt_lengths[j])
        if sequence_hash(data, prompt_length) != int(self._hashes[j]):
            raise CacheError(
                f"{self.directory}: sequence {j} (pair {self.pair_ids[j // 2]}) does not match the checksum "
                f"written with it: the store was damaged after it was written; {self.remedy}"
            )
        return TokenizedSequence(tuple(np.frombuffer(data, dtype=np.int32).tolist()), prompt_length)

    def _read(self, start: int, end: int) -> bytes:
        data = os.pread(self._file, 4 * (end - start), 4 * start)
        if len(data) != 4 * (end - start):
            raise CacheError(
                f"{self.directory / IDS_FILE}: short read at token {start} (the file changed underneath); "
                f"{self.remedy}"
            )
        return data

    def _ids_between(self, start: int, end: int) -> tuple[int, ...]:
        return tuple(np.frombuffer(self._read(start, end), dtype=np.int32).tolist())

    def __getstate__(self) -> dict:
        # A data loader worker gets its own descriptor: an open file does not travel to another process.
        return {**self.__dict__, "_file": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._file = os.open(self.directory / IDS_FILE, os.O_RDONLY)

    def __del__(self) -> None:
        if getattr(self, "_file", None) is not None:
            os.close(self._file)

    def __repr__(self) -> str:
        return f"StoredPairs({len(self)} pairs in {self.directory})"


def _read_pair_ids(path: Path, remedy: str) -> np.ndarray:
    content = path.read_bytes()
    # PairWriter writes only ASCII ids: another byte is damage, one line here rather than a UnicodeDecodeError at
    # the first id read.
    (foreign,) = np.nonzero(np.frombuffer(content, dtype=np.uint8) >= 128)
    if len(foreign):
        at = int(foreign[0])
        line = content.count(b"\n", 0, at) + 1
        raise CacheError(
            f"{path}: line {line} holds the byte 0x{content[at]:02x}, and pair ids are "
            f"ASCII: the store was damaged after it was written; {remedy}"
        )
    width = content.find(b"\n")
    if width > 0 and len(content) % (width + 1) == 0:
        rows = np.frombuffer(content, dtype=np.uint8).reshape(-1, width + 1)
        if (rows[:, width] == ord("\n")).all() and content.count(b"\n") == len(rows):
            # Every id the same width (the usual case): one array, no Python string per id.
            return rows[:, :width].copy().view(f"S{width}").ravel()
    return np.array(content.split(b"\n")[:-1], dtype=bytes)


class PairWriter:
    """Writes tokenized pairs into a directory as they come, a block at a time; ``finish`` flushes and returns
    the ``StoredPairs`` that read them back."""

    BLOCK_TOKENS = 1 << 22  # 16 MiB of ids buffered before a write

    def __init__(self, directory: str | os.PathLike, *, remedy: str = ""):
        self.directory = Path(directory)
        self.remedy = remedy
        """What the ``StoredPairs`` returned by ``finish`` advise when a read finds damage."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._files = {
            name: (self.directory / name).open("wb")
            for name in (IDS_FILE, ENDS_FILE, PROMPTS_FILE, HASHES_FILE)
        }
        self._pair_ids = (self.directory / PAIR_IDS_FILE).open("w", encoding="ascii")
        self._ids, self._ends, self._prompt_lengths = array("i"), array("q"), array("i")
        self._hashes = array("Q")
        self._written_tokens = 0

    def append(self, pair: TokenizedPair) -> None:
        for sequence in (pair.chosen, pair.rejected):
            start = len(self._ids)
            self._ids.extend(sequence.input_ids)
            self._ends.append(self._written_tokens + len(self._ids))
            self._prompt_lengths.append(sequence.prompt_length)
            self._hashes.append(sequence_hash(_native_ids(self._ids, start), sequence.prompt_length))
        _check_storable(pair.pair_id)
        self._pair_ids.write(pair.pair_id + "\n")
        if len(self._ids) >= self.BLOCK_TOKENS:
            self._flush()

    def extend(self, pairs: TokenizedPairs) -> None:
        """Append every pair of ``pairs`` (a block tokenized elsewhere), its checksums as they were computed."""
        for pair_id in pairs.pair_ids:
            _check_storable(pair_id)
        _extend_flat(self, pairs, offset=self._written_tokens + len(self._ids))
        self._pair_ids.write("".join(pair_id + "\n" for pair_id in pairs.pair_ids))
        if len(self._ids) >= self.BLOCK_TOKENS:
            self._flush()

    def _flush(self) -> None:
        for name, buffer in (
            (IDS_FILE, self._ids),
            (ENDS_FILE, self._ends),
            (PROMPTS_FILE, self._prompt_lengths),
            (HASHES_FILE, self._hashes),
        ):
            buffer.tofile(self._files[name])
        self._written_tokens += len(self._ids)
        self._ids, self._ends, self._prompt_lengths = array("i"), array("q"), array("i")
        self._hashes = array("Q")

    def finish(self) -> StoredPairs:
        self._flush()
        for handle in (*self._files.values(), self._pair_ids):
            handle.flush()
            os.fsync(handle.fileno())
        self.close()
        return StoredPairs(self.directory, remedy=self.remedy)

    def close(self) -> None:
        """Close the files (``finish`` does; call it when giving up on a store half written)."""
        for handle in (*self._files.values(), self._pair_ids):
            handle.close()


def _check_storable(pair_id: str) -> None:
    if "\n" in pair_id or not pair_id.isascii():
        raise ValueError(f"pair id {pair_id!r} cannot be stored: ids are ASCII without newlines")


def sequence_lengths(pairs: Sequence[TokenizedPair]) -> Sequence[int]:
    """Lengths of the 2N sequences of ``pairs`` (chosen, rejected, chosen, ...)."""
    if isinstance(pairs, _FlatPairs):
        return pairs.sequence_lengths()
    return [len(s.input_ids) for pair in pairs for s in (pair.chosen, pair.rejected)]


def pair_ids_of(pairs: Sequence[TokenizedPair]) -> Sequence[str]:
    """The pair ids of ``pairs``, in order, without building any pair."""
    if isinstance(pairs, _FlatPairs):
        return pairs.pair_ids
    return [pair.pair_id for pair in pairs]


def pair_token_tags(pairs: Sequence[TokenizedPair]) -> np.ndarray:
    """Each pair's 64-bit tag of its exact tokens (uint64, in order): kept by the stores, computed otherwise."""
    if isinstance(pairs, _FlatPairs):
        return pairs.pair_tags()
    hashes = np.fromiter(
        (
            sequence_hash(_ids_bytes(s.input_ids), s.prompt_length)
            for pair in pairs
            for s in (pair.chosen, pair.rejected)
        ),
        dtype=np.uint64,
        count=2 * len(pairs),
    )
    return combine_pair_tags(hashes)


def sequence_at(pairs: Sequence[TokenizedPair], j: int) -> TokenizedSequence:
    """Sequence j of ``pairs`` in the order of ``sequence_lengths`` (pair j // 2; chosen when j is even)."""
    if isinstance(pairs, _FlatPairs):
        return pairs.sequence(j)
    pair = pairs[j // 2]
    return pair.rejected if j % 2 else pair.chosen
