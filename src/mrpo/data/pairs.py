"""A preference pair, a validated set of them (``PairSet``, in memory) or a validated stream of them
(``PairStream``, one row at a time, leaving ``PairCounts``); the rules for one row are ``rows.py``'s.

Three row formats are accepted, as in TRL:

* standard: ``prompt``, ``chosen`` and ``rejected`` are strings;
* conversational: ``prompt`` is a list of ``{"role", "content"}`` messages and ``chosen``/``rejected`` are
  lists of messages (assistant turns) or plain strings, which become one assistant message;
* implicit prompt: no ``prompt`` column; ``chosen``/``rejected`` are whole conversations sharing a prefix of
  messages. The shared prefix becomes the prompt and the remainders become the completions. The conversations may
  also be HH-RLHF transcripts ("\\n\\nHuman: ...\\n\\nAssistant: ..." strings): they are read as user/assistant
  messages, every turn but the last is the prompt and each last Assistant turn a completion.

Every row is either kept as a :class:`PreferencePair` or, with ``on_error="drop"``, counted under a short reason
in :attr:`PairSet.dropped`; with ``on_error="raise"`` the first bad row raises a :class:`DataError` naming the
source, the row and the field. Each pair carries a content hash (``pair_id``) so caches keyed by it survive
reordering and subsampling of the data. Reading files and datasets is ``sources.py``'s.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import warnings
from array import array
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, overload

from mrpo.data.rows import TRANSCRIPT_FORMAT, RowError, Text, is_transcript, parse_row, row_format
from mrpo.errors import DataError

__all__ = [
    "PairCounts",
    "PairSet",
    "PairStream",
    "PreferencePair",
    "build_pair_set",
    "compute_pair_id",
]

logger = logging.getLogger(__name__)

OnError = Literal["raise", "drop"]
Format = Literal["auto", "standard", "conversational", "implicit"]
Rows = Iterator[tuple[str, Any]]
"""(row label, row): the label says where the row is, for error messages ("line 7", "row index 3 (0-based)")."""

_DROP_IDENTICAL_REASON = "identical chosen and rejected"


def compute_pair_id(prompt: Text, chosen: Text, rejected: Text) -> str:
    """Content hash of a pair: first 16 hex digits of sha256 over the canonical JSON of its three texts."""
    canonical = json.dumps(
        {"prompt": prompt, "chosen": chosen, "rejected": rejected},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class PreferencePair:
    """One preference pair: a prompt, a preferred (chosen) and a dispreferred (rejected) completion."""

    pair_id: str
    """Content hash of prompt/chosen/rejected (see :func:`compute_pair_id`); same text, same id."""
    prompt: Text
    """A string (standard) or a list of {"role", "content"} messages (conversational)."""
    chosen: Text
    """A string, or a list of messages starting with an assistant message."""
    rejected: Text
    metadata: dict = field(default_factory=dict, compare=False)
    """The row's other columns, kept as read; not part of the id."""

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)

    # Prompt and completions may be lists, so the generated field hash would fail; the id is a content hash.
    def __hash__(self) -> int:
        return hash(self.pair_id)

    @classmethod
    def build(
        cls, prompt: Text, chosen: Text, rejected: Text, metadata: dict | None = None
    ) -> PreferencePair:
        """A pair with its id computed from the texts (no validation: use :func:`pairs_from_records` for that)."""
        return cls(compute_pair_id(prompt, chosen, rejected), prompt, chosen, rejected, dict(metadata or {}))


@dataclass
class PairSet:
    """The pairs read from one source, with an account of every row: ``rows_read == len(pairs) + sum(dropped)``."""

    pairs: list[PreferencePair]
    source: str
    """What was read: a path, or a hub id / saved dataset with its split."""
    rows_read: int
    dropped: collections.Counter = field(default_factory=collections.Counter)
    """Short reason -> number of rows dropped for it (invalid rows, identical pairs, subsampling, overflow)."""
    identical: int = 0
    """Rows whose chosen equals their rejected (no preference signal); counted whether kept or dropped."""
    transcripts: int = 0
    """Rows whose chosen/rejected were HH-RLHF transcripts, kept or dropped."""

    @property
    def fingerprint(self) -> str:
        """sha256 over the ordered pair ids: changes when any kept pair's text or the order changes."""
        digest = hashlib.sha256()
        for pair in self.pairs:
            digest.update(pair.pair_id.encode("ascii"))
            digest.update(b"\n")
        return digest.hexdigest()

    @property
    def duplicates(self) -> int:
        """Kept pairs whose text repeats an earlier pair's (same pair_id)."""
        return len(self.pairs) - len({pair.pair_id for pair in self.pairs})

    def counts(self) -> PairCounts:
        return PairCounts(
            source=self.source,
            rows_read=self.rows_read,
            kept=len(self.pairs),
            dropped=collections.Counter(self.dropped),
            identical=self.identical,
            duplicates=self.duplicates,
            conversational=self.pairs[0].conversational if self.pairs else None,
            transcripts=self.transcripts,
        )

    def summary(self) -> str:
        """One readable paragraph: what was read, what was kept, and why anything else was dropped."""
        return self.counts().summary()

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self) -> Iterator[PreferencePair]:
        return iter(self.pairs)

    @overload
    def __getitem__(self, index: int) -> PreferencePair: ...
    @overload
    def __getitem__(self, index: slice) -> list[PreferencePair]: ...
    def __getitem__(self, index: int | slice) -> PreferencePair | list[PreferencePair]:
        return self.pairs[index]


@dataclass
class PairCounts:
    """The account of one read without the pairs themselves: what a streamed read leaves behind."""

    source: str
    rows_read: int
    kept: int
    dropped: collections.Counter = field(default_factory=collections.Counter)
    identical: int = 0
    duplicates: int = 0
    conversational: bool | None = None
    first_identical: str = field(default="", compare=False)
    """Where the first row with chosen == rejected is (a streamed read knows; a PairSet does not keep it)."""
    transcripts: int = 0
    """Rows whose chosen/rejected were HH-RLHF transcripts, kept or dropped."""

    def summary(self) -> str:
        """One readable paragraph: what was read, what was kept, and why anything else was dropped."""
        kind = {True: "conversational ", False: "standard ", None: ""}[self.conversational]
        text = f"Read {self.rows_read} rows from {self.source}"
        if self.transcripts:
            share = "" if self.transcripts == self.rows_read else f", {self.transcripts} of the rows"
            text += f" (format {TRANSCRIPT_FORMAT}{share})"
        text += f"; kept {self.kept} {kind}pairs"
        total_dropped = sum(self.dropped.values())
        if total_dropped:
            # Most frequent first, ties by name: the same text whichever order the reasons were met in.
            ordered = sorted(self.dropped.items(), key=lambda item: (-item[1], item[0]))
            reasons = ", ".join(f"{reason}: {count}" for reason, count in ordered)
            text += f"; dropped {total_dropped} ({reasons})"
        else:
            text += "; dropped 0"
        if self.identical:
            fate = "dropped" if self.dropped.get(_DROP_IDENTICAL_REASON) else "kept"
            text += f". {self.identical} rows have chosen == rejected ({fate})"
        if self.duplicates:
            text += f". {self.duplicates} kept pairs repeat an earlier pair's text"
        return text + "."

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "dropped": dict(self.dropped)}

    @classmethod
    def from_dict(cls, content: dict[str, Any]) -> PairCounts:
        return cls(**{**content, "dropped": collections.Counter(content["dropped"])})


class PairStream:
    """The pairs of a source read one row at a time, validated by the same rules as :func:`build_pair_set`, never
    held together: for data sets larger than memory. Iterate once; then :meth:`counts` gives the account (and
    raises the errors a read that kept nothing raises). Duplicates are counted from 8 bytes a pair."""

    def __init__(self, rows: Rows, label: str, *, on_error: OnError, fmt: Format, drop_identical: bool):
        self._rows, self._label = rows, label
        self._options = {"on_error": on_error, "fmt": fmt, "drop_identical": drop_identical}
        self._tally: _Tally | None = None
        self._id_prefixes = array("Q")
        self._conversational: bool | None = None

    def __iter__(self) -> Iterator[PreferencePair]:
        if self._tally is not None:
            raise RuntimeError(f"{self._label}: a PairStream is read once")
        self._tally = _Tally()
        for pair in _valid_pairs(self._rows, self._label, self._tally, **self._options):
            if self._conversational is None:
                self._conversational = pair.conversational
            self._id_prefixes.append(_id_number(pair.pair_id))
            yield pair

    def counts(self) -> PairCounts:
        if self._tally is None:
            raise RuntimeError(f"{self._label}: read the stream before asking for its counts")
        import numpy as np

        tally, kept = self._tally, len(self._id_prefixes)
        distinct = len(np.unique(np.frombuffer(self._id_prefixes, dtype=np.uint64))) if kept else 0
        counts = PairCounts(
            self._label, tally.rows_read, kept, collections.Counter(tally.dropped), tally.identical,
            kept - distinct, self._conversational, tally.first_identical, tally.transcripts,
        )  # fmt: skip
        _check_read(tally, self._label, kept, self._options["drop_identical"], counts.summary, stacklevel=2)
        return counts


def _id_number(pair_id: str) -> int:
    """A pair id (16 hex digits, from :func:`compute_pair_id`) as the 64-bit number it spells."""
    return int(pair_id, 16)


def subsample(pairs: PairSet, max_pairs: int, seed: int, *, cap_name: str = "max_pairs") -> PairSet:
    """Keep ``max_pairs`` pairs chosen by ``seed``, nested across sizes, in their original order.

    Pairs are ranked by ``sha256(seed, pair_id)`` and the top ``max_pairs`` are kept, so for one seed the
    32-pair subsample is contained in the 128-pair one (data-scarcity curves compare like with like) and the
    choice does not depend on row order. The rows left out are counted in ``dropped``, under a reason that names
    the setting (``cap_name``: "max_pairs", or "max_eval_pairs" for a held-out split).
    """
    if max_pairs < 1:
        raise ValueError(f"max_pairs must be at least 1, got {max_pairs}")
    if max_pairs >= len(pairs.pairs):
        return PairSet(
            list(pairs.pairs),
            pairs.source,
            pairs.rows_read,
            collections.Counter(pairs.dropped),
            pairs.identical,
            pairs.transcripts,
        )

    def rank(indexed: tuple[int, PreferencePair]) -> tuple[str, int]:
        index, pair = indexed
        return hashlib.sha256(f"{seed}\0{pair.pair_id}".encode()).hexdigest(), index

    chosen_indices = sorted(index for index, _ in sorted(enumerate(pairs.pairs), key=rank)[:max_pairs])
    dropped = collections.Counter(pairs.dropped)
    dropped[f"not in subsample ({cap_name}={max_pairs}, seed={seed})"] += len(pairs.pairs) - max_pairs
    return PairSet(
        [pairs.pairs[index] for index in chosen_indices],
        pairs.source,
        pairs.rows_read,
        dropped,
        pairs.identical,
        pairs.transcripts,
    )


def build_pair_set(
    rows: Rows,
    label: str,
    *,
    max_pairs: int | None,
    seed: int,
    on_error: OnError,
    fmt: Format,
    drop_identical: bool,
    cap_name: str = "max_pairs",
) -> PairSet:
    tally = _Tally()
    pairs = list(_valid_pairs(rows, label, tally, on_error=on_error, fmt=fmt, drop_identical=drop_identical))
    pair_set = PairSet(pairs, label, tally.rows_read, tally.dropped, tally.identical, tally.transcripts)
    _check_read(tally, label, len(pairs), drop_identical, pair_set.summary, stacklevel=3)
    if max_pairs is not None:
        pair_set = subsample(pair_set, max_pairs, seed, cap_name=cap_name)
    logger.info(pair_set.summary())
    return pair_set


@dataclass
class _Tally:
    rows_read: int = 0
    dropped: collections.Counter = field(default_factory=collections.Counter)
    identical: int = 0
    first_identical: str = ""
    transcripts: int = 0


def _valid_pairs(
    rows: Rows, label: str, tally: _Tally, *, on_error: OnError, fmt: Format, drop_identical: bool
) -> Iterator[PreferencePair]:
    """The row rules, one row at a time: each row becomes a pair, a counted drop, or (on_error="raise") an error."""
    detected: str | None = None if fmt == "auto" else fmt
    detected_at = ""
    for where, row in rows:
        tally.rows_read += 1
        try:
            if isinstance(row, RowError):
                raise row
            found_format = row_format(row, detected, detected_at)
            if found_format == "implicit" and is_transcript(row["chosen"]) and is_transcript(row["rejected"]):
                tally.transcripts += 1
            pair = PreferencePair.build(*parse_row(row, found_format))
        except RowError as error:
            if on_error == "raise":
                raise _to_data_error(error, label, where) from None
            tally.dropped[error.reason] += 1
            continue
        if detected is None:
            detected, detected_at = found_format, where
        if pair.chosen == pair.rejected:
            tally.identical += 1
            tally.first_identical = tally.first_identical or where
            if drop_identical:
                tally.dropped[_DROP_IDENTICAL_REASON] += 1
                continue
        yield pair


def warn_identical(label: str, identical: int, first: str, drop_identical: bool, *, stacklevel: int) -> None:
    """The warning every read of rows whose chosen equals their rejected gives (also when read from a cache)."""
    warnings.warn(
        f"{label}: {identical} rows have chosen == rejected (first: {first}); they carry no preference signal. "
        + ("Dropped (drop_identical=True)." if drop_identical else "Pass drop_identical=True to drop them."),
        UserWarning,
        stacklevel=stacklevel + 1,
    )


def _check_read(
    tally: _Tally, label: str, kept: int, drop_identical: bool, summary: Callable[[], str], *, stacklevel: int
) -> None:
    """What every read ends with: no rows is an error, identical pairs are warned about, nothing kept is an error."""
    if tally.rows_read == 0:
        raise DataError(
            f"{label}: no rows. The source is empty; expected rows with prompt/chosen/rejected.", source=label
        )
    if tally.identical:
        warn_identical(
            label, tally.identical, tally.first_identical, drop_identical, stacklevel=stacklevel + 1
        )
    if not kept:
        raise DataError(
            f"{label}: no valid rows left: {summary()} Fix the rows or check the format.", source=label
        )


def _to_data_error(error: RowError, label: str, where: str) -> DataError:
    field_part = f", field {error.field_name!r}" if error.field_name else ""
    return DataError(
        f"{label}, {where}{field_part}: {error.detail}. Fix or remove the row, or set data.on_error=drop to skip "
        "such rows (they are counted).",
        source=label,
        row=where,
        field=error.field_name,
        reason=error.reason,
    )
