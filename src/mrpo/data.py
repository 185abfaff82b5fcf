"""Read and validate preference pairs (prompt, chosen, rejected) from files, hub datasets or memory.

Three row formats are accepted, as in TRL:

* standard: ``prompt``, ``chosen`` and ``rejected`` are strings;
* conversational: ``prompt`` is a list of ``{"role", "content"}`` messages and ``chosen``/``rejected`` are
  lists of messages (assistant turns) or plain strings, which become one assistant message;
* implicit prompt: no ``prompt`` column; ``chosen``/``rejected`` are whole conversations sharing a prefix of
  messages. The shared prefix becomes the prompt and the remainders become the completions.

Every row read is either kept as a :class:`PreferencePair` or, with ``on_error="drop"``, counted under a short
reason in :attr:`PairSet.dropped`; with ``on_error="raise"`` the first bad row raises a :class:`DataError`
naming the file, the row and the field. Each pair carries a content hash (``pair_id``) so caches keyed by it
survive reordering and subsampling of the data.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, overload

from mrpo.errors import DataError

__all__ = [
    "DataError",
    "PairSet",
    "PreferencePair",
    "compute_pair_id",
    "load_pairs",
    "pairs_from_records",
    "subsample",
]

logger = logging.getLogger(__name__)

OnError = Literal["raise", "drop"]
Format = Literal["auto", "standard", "conversational", "implicit"]
Text = str | list[dict]

MESSAGE_ROLES = frozenset({"system", "user", "assistant", "tool"})
PAIR_FIELDS = ("prompt", "chosen", "rejected")
SUPPORTED_SOURCES = (
    '.jsonl, .json (a list of objects or {"data": [...]}), .parquet, a directory written by '
    "datasets' save_to_disk, or a Hugging Face hub dataset id"
)
_FORMATS = ("auto", "standard", "conversational", "implicit")
_ON_ERROR = ("raise", "drop")
# A hub id is "name" or "owner/name"; anything else that does not exist locally is a mistyped path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
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

    def summary(self) -> str:
        """One readable paragraph: what was read, what was kept, and why anything else was dropped."""
        kind = ("conversational " if self.pairs[0].conversational else "standard ") if self.pairs else ""
        text = f"Read {self.rows_read} rows from {self.source}; kept {len(self.pairs)} {kind}pairs"
        total_dropped = sum(self.dropped.values())
        if total_dropped:
            reasons = ", ".join(f"{reason}: {count}" for reason, count in self.dropped.most_common())
            text += f"; dropped {total_dropped} ({reasons})"
        else:
            text += "; dropped 0"
        if self.identical:
            fate = "dropped" if self.dropped.get(_DROP_IDENTICAL_REASON) else "kept"
            text += f". {self.identical} rows have chosen == rejected ({fate})"
        if self.duplicates:
            text += f". {self.duplicates} kept pairs repeat an earlier pair's text"
        return text + "."

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


# --------------------------------------------------------------------------------------------------------------
# Public entry points


def load_pairs(
    source: str | os.PathLike,
    *,
    split: str = "train",
    max_pairs: int | None = None,
    seed: int = 0,
    on_error: OnError = "raise",
    fmt: Format = "auto",
    drop_identical: bool = False,
) -> PairSet:
    """Read preference pairs from a file, a saved dataset directory or a hub dataset.

    Args:
        source: a ``.jsonl``/``.json``/``.parquet`` file, a directory written by ``datasets``' ``save_to_disk``
            (a Dataset, or a DatasetDict from which ``split`` is taken), or a hub dataset id.
        split: the split to read from a DatasetDict directory or a hub dataset.
        max_pairs: keep at most this many pairs, chosen by :func:`subsample` with ``seed``.
        seed: the subsampling seed.
        on_error: ``"raise"`` stops at the first bad row; ``"drop"`` skips bad rows and counts them by reason.
        fmt: the row format; ``"auto"`` takes it from the first valid row and holds every row to it.
        drop_identical: drop rows whose chosen equals their rejected (they are always counted and warned about).
    """
    _check_options(on_error, fmt)
    label, rows = _open_source(source, split)
    return _build_pair_set(
        rows, label, max_pairs=max_pairs, seed=seed, on_error=on_error, fmt=fmt, drop_identical=drop_identical
    )


def pairs_from_records(
    records: Iterable[dict],
    *,
    source: str = "<memory>",
    max_pairs: int | None = None,
    seed: int = 0,
    on_error: OnError = "raise",
    fmt: Format = "auto",
    drop_identical: bool = False,
) -> PairSet:
    """Validate in-memory rows (dicts) exactly as :func:`load_pairs` validates the rows of a file."""
    _check_options(on_error, fmt)
    rows = ((f"row index {index} (0-based)", record) for index, record in enumerate(records))
    return _build_pair_set(
        rows,
        source,
        max_pairs=max_pairs,
        seed=seed,
        on_error=on_error,
        fmt=fmt,
        drop_identical=drop_identical,
    )


def subsample(pairs: PairSet, max_pairs: int, seed: int) -> PairSet:
    """Keep ``max_pairs`` pairs chosen by ``seed``, nested across sizes, in their original order.

    Pairs are ranked by ``sha256(seed, pair_id)`` and the top ``max_pairs`` are kept, so for one seed the
    32-pair subsample is contained in the 128-pair one (data-scarcity curves compare like with like) and the
    choice does not depend on row order. The rows left out are counted in ``dropped``.
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
        )

    def rank(indexed: tuple[int, PreferencePair]) -> tuple[str, int]:
        index, pair = indexed
        return hashlib.sha256(f"{seed}\0{pair.pair_id}".encode()).hexdigest(), index

    chosen_indices = sorted(index for index, _ in sorted(enumerate(pairs.pairs), key=rank)[:max_pairs])
    dropped = collections.Counter(pairs.dropped)
    dropped[f"not in subsample (max_pairs={max_pairs}, seed={seed})"] += len(pairs.pairs) - max_pairs
    return PairSet(
        [pairs.pairs[index] for index in chosen_indices],
        pairs.source,
        pairs.rows_read,
        dropped,
        pairs.identical,
    )


# --------------------------------------------------------------------------------------------------------------
# Sources: each yields (row label, row) where the label says where the row is, for error messages.

Rows = Iterator[tuple[str, Any]]


def _check_options(on_error: str, fmt: str) -> None:
    if on_error not in _ON_ERROR:
        raise ValueError(f"on_error must be one of {_ON_ERROR}, got {on_error!r}")
    if fmt not in _FORMATS:
        raise ValueError(f"fmt must be one of {_FORMATS}, got {fmt!r}")


def _open_source(source: str | os.PathLike, split: str) -> tuple[str, Rows]:
    path = Path(source).expanduser()
    label = str(source)
    if path.is_dir():
        return _open_saved_dataset(path, split)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return label, _jsonl_rows(path, label)
        if suffix == ".json":
            return label, _json_rows(path, label)
        if suffix == ".parquet":
            return label, _parquet_rows(path, label)
        raise DataError(
            f"{label}: unsupported file type {path.suffix or '(no extension)'!r}. "
            f"Supported sources: {SUPPORTED_SOURCES}.",
            source=label,
        )
    if isinstance(source, str) and _HUB_ID.match(source) and not source.lower().endswith(_FILE_SUFFIXES):
        return _open_hub_dataset(source, split)
    raise DataError(
        f"{label}: no such file or directory (and not a hub dataset id). "
        f"Check the path; supported sources: {SUPPORTED_SOURCES}.",
        source=label,
    )


def _jsonl_rows(path: Path, label: str) -> Rows:
    # Read bytes line by line so that bad encoding or bad JSON is reported with its line number.
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            where = f"line {line_number}"
            try:
                text = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                yield (
                    where,
                    _RowError(
                        "invalid UTF-8",
                        None,
                        f"the line is not valid UTF-8 ({error.reason} at "
                        f"byte {error.start}); re-save the file as UTF-8",
                    ),
                )
                continue
            if not text.strip():
                continue  # blank lines (often a trailing newline) are not rows
            try:
                yield where, json.loads(text)
            except json.JSONDecodeError as error:
                yield (
                    where,
                    _RowError(
                        "invalid JSON",
                        None,
                        f"invalid JSON ({error.msg} at column {error.colno}); "
                        "each line must hold one JSON object",
                    ),
                )


def _json_rows(path: Path, label: str) -> Rows:
    try:
        document = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as error:
        raise DataError(
            f"{label}: not valid UTF-8 ({error.reason} at byte {error.start}); re-save it as UTF-8.",
            source=label,
        ) from error
    except json.JSONDecodeError as error:
        raise DataError(
            f"{label}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}.",
            source=label,
            row=f"line {error.lineno}",
            reason="invalid JSON",
        ) from error
    if isinstance(document, dict) and isinstance(document.get("data"), list):
        document = document["data"]
    if not isinstance(document, list):
        found = (
            f"an object with keys {sorted(document)[:5]}"
            if isinstance(document, dict)
            else type(document).__name__
        )
        raise DataError(
            f'{label}: expected a JSON list of row objects or {{"data": [...]}}, found {found}. '
            "For one object per line, name the file .jsonl.",
            source=label,
        )
    return ((f"row index {index} (0-based)", row) for index, row in enumerate(document))


def _parquet_rows(path: Path, label: str) -> Rows:
    import pyarrow.parquet as pq  # pyarrow comes with datasets

    try:
        parquet_file = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises several types for corrupt files
        raise DataError(f"{label}: cannot read as Parquet ({error}).", source=label) from error
    index = 0
    for batch in parquet_file.iter_batches():
        for row in batch.to_pylist():
            yield f"row index {index} (0-based)", row
            index += 1


def _open_saved_dataset(path: Path, split: str) -> tuple[str, Rows]:
    import datasets

    markers = ("dataset_dict.json", "dataset_info.json", "state.json")
    if not any((path / marker).exists() for marker in markers):
        raise DataError(
            f"{path}: a directory, but not one written by datasets' save_to_disk (no {markers[0]} or "
            f"{markers[2]}). Point at a .jsonl/.json/.parquet file inside it instead.",
            source=str(path),
        )
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as error:
        raise DataError(f"{path}: cannot load the saved dataset ({error}).", source=str(path)) from error
    label = str(path)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(
                f"{path}: no split {split!r}; available splits: {sorted(loaded)}. Pass split=...",
                source=label,
            )
        loaded, label = loaded[split], f"{path} (split {split})"
    return label, _dataset_rows(loaded)


def _open_hub_dataset(source: str, split: str) -> tuple[str, Rows]:
    import datasets

    label = f"{source} (split {split})"
    try:
        loaded = datasets.load_dataset(source, split=split)
    except (
        Exception
    ) as error:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError ...)
        offline = " Offline mode is on (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE)." if _offline() else ""
        raise DataError(
            f"{source!r} is neither a local file nor a reachable hub dataset with split {split!r} "
            f"({type(error).__name__}: {error}).{offline} Check the path or the dataset id; supported "
            f"sources: {SUPPORTED_SOURCES}.",
            source=label,
        ) from error
    return label, _dataset_rows(loaded)


def _offline() -> bool:
    return any(
        os.environ.get(name, "").lower() in ("1", "true", "yes", "on")
        for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    )


def _dataset_rows(dataset: Any) -> Rows:
    return ((f"row index {index} (0-based)", row) for index, row in enumerate(dataset))


# --------------------------------------------------------------------------------------------------------------
# Row validation


class _RowError(Exception):
    """A bad row: ``reason`` is the short drop reason, ``detail`` the sentence a user reads."""

    def __init__(self, reason: str, field_name: str | None, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.field_name = field_name
        self.detail = detail


def _build_pair_set(
    rows: Rows,
    label: str,
    *,
    max_pairs: int | None,
    seed: int,
    on_error: OnError,
    fmt: Format,
    drop_identical: bool,
) -> PairSet:
    pairs: list[PreferencePair] = []
    dropped: collections.Counter = collections.Counter()
    identical_rows: list[str] = []
    rows_read = 0
    detected: str | None = None if fmt == "auto" else fmt
    detected_at = ""
    for where, row in rows:
        rows_read += 1
        try:
            if isinstance(row, _RowError):
                raise row
            row_format = _row_format(row, detected, detected_at)
            pair = _parse_row(row, row_format)
        except _RowError as error:
            if on_error == "raise":
                raise _to_data_error(error, label, where) from None
            dropped[error.reason] += 1
            continue
        if detected is None:
            detected, detected_at = row_format, where
        if pair.chosen == pair.rejected:
            identical_rows.append(where)
            if drop_identical:
                dropped[_DROP_IDENTICAL_REASON] += 1
                continue
        pairs.append(pair)
    if rows_read == 0:
        raise DataError(
            f"{label}: no rows. The source is empty; expected rows with prompt/chosen/rejected.", source=label
        )
    pair_set = PairSet(pairs, label, rows_read, dropped, len(identical_rows))
    if identical_rows:
        warnings.warn(
            f"{label}: {len(identical_rows)} rows have chosen == rejected (first: {identical_rows[0]}); "
            "they carry no preference signal. "
            + (
                "Dropped (drop_identical=True)."
                if drop_identical
                else "Pass drop_identical=True to drop them."
            ),
            UserWarning,
            stacklevel=3,
        )
    if not pairs:
        raise DataError(
            f"{label}: no valid rows left: {pair_set.summary()} Fix the rows or check the format.",
            source=label,
        )
    if max_pairs is not None:
        pair_set = subsample(pair_set, max_pairs, seed)
    logger.info(pair_set.summary())
    return pair_set


def _to_data_error(error: _RowError, label: str, where: str) -> DataError:
    field_part = f", field {error.field_name!r}" if error.field_name else ""
    return DataError(
        f"{label}, {where}{field_part}: {error.detail}. Fix or remove the row, or pass "
        "on_error='drop' to skip such rows (they are counted).",
        source=label,
        row=where,
        field=error.field_name,
        reason=error.reason,
    )


def _row_format(row: Any, expected: str | None, expected_at: str) -> str:
    """The row's format, checked against the one fixed by ``fmt`` or detected from an earlier row."""
    if not isinstance(row, dict):
        raise _RowError(
            "not an object",
            None,
            f"expected a JSON object with prompt/chosen/rejected, found {type(row).__name__}",
        )
    for name in ("chosen", "rejected"):
        if row.get(name) is None:
            raise _RowError(
                f"missing field {name!r}",
                name,
                f"missing field {name!r} (every row needs chosen and rejected)",
            )
    prompt = row.get("prompt")
    if prompt is None:
        found = "implicit"
    elif isinstance(prompt, str):
        found = "standard"
    elif isinstance(prompt, list):
        found = "conversational"
    else:
        raise _RowError(
            "wrong type", "prompt", f"expected a string or a list of messages, found {type(prompt).__name__}"
        )
    if expected is None or found == expected:
        return found
    if found == "implicit":
        raise _RowError(
            "missing field 'prompt'",
            "prompt",
            f"missing field 'prompt' (the data is {expected}"
            + (f", as detected from {expected_at}" if expected_at else "")
            + ")",
        )
    source_of_format = f"detected from {expected_at}" if expected_at else "set by fmt"
    raise _RowError(
        "format mismatch",
        "prompt",
        f"this row is {found} but the data is {expected} ({source_of_format}); make all rows one format",
    )


def _parse_row(row: dict, row_format: str) -> PreferencePair:
    metadata = {key: value for key, value in row.items() if key not in PAIR_FIELDS}
    if row_format == "implicit":
        prompt, chosen, rejected = _split_implicit(row["chosen"], row["rejected"])
    elif row_format == "standard":
        prompt = _require_text(row["prompt"], "prompt", empty_reason="empty prompt")
        chosen, rejected = (_standard_completion(row[name], name) for name in ("chosen", "rejected"))
    else:
        prompt = _require_messages(row["prompt"], "prompt")
        if _blank(prompt):
            raise _RowError("empty prompt", "prompt", "the prompt has no content")
        chosen, rejected = (_conversational_completion(row[name], name) for name in ("chosen", "rejected"))
    return PreferencePair.build(prompt, chosen, rejected, metadata)


def _require_text(value: Any, name: str, *, empty_reason: str) -> str:
    if not isinstance(value, str):
        raise _RowError("wrong type", name, f"expected a string, found {type(value).__name__}")
    if not value.strip():
        raise _RowError(empty_reason, name, f"{name} is empty (or only whitespace)")
    return value


def _standard_completion(value: Any, name: str) -> str:
    if isinstance(value, list):
        raise _RowError(
            "mixed types",
            name,
            f"{name} is a message list but prompt is a string; give the prompt as "
            "messages too (conversational) or the completion as a string (standard)",
        )
    return _require_text(value, name, empty_reason="empty completion")


def _conversational_completion(value: Any, name: str) -> list[dict]:
    # A plain-string completion under a conversational prompt is one assistant message (as in TRL).
    if isinstance(value, str):
        messages = [{"role": "assistant", "content": value}]
    else:
        messages = _require_messages(value, name, empty_reason="empty completion")
    _check_completion(messages, name)
    return messages


def _check_completion(messages: list[dict], name: str) -> None:
    if messages[0]["role"] != "assistant":
        raise _RowError(
            "completion not from assistant",
            name,
            f"{name} must start with an assistant message, found role {messages[0]['role']!r}",
        )
    if messages[-1]["role"] != "assistant":
        # Every token of a completion is trained on as the model's own: a trailing user (or tool, or system) turn
        # would teach the policy to write the other side's text.
        raise _RowError(
            "completion not ending with assistant",
            name,
            f"{name} ends with a {messages[-1]['role']!r} message (message {len(messages) - 1}); a completion is "
            "trained on as the model's own text and must end with the assistant's turn",
        )
    if _blank(messages):
        raise _RowError("empty completion", name, f"{name} is empty (its messages have no content)")


def _require_messages(value: Any, name: str, *, empty_reason: str = "empty prompt") -> list[dict]:
    """Validated copy of a message list; None-valued extra keys are removed (see below)."""
    if not isinstance(value, list):
        raise _RowError(
            "malformed message", name, f"expected a list of messages, found {type(value).__name__}"
        )
    if not value:
        raise _RowError(empty_reason, name, f"{name} is an empty message list")
    return [_require_message(message, name, index) for index, message in enumerate(value)]


def _require_message(message: Any, name: str, index: int) -> dict:
    where = f"message {index} of {name}"
    if not isinstance(message, dict):
        raise _RowError(
            "malformed message",
            name,
            f"{where} is a {type(message).__name__}, not an object with role and content",
        )
    role, content = message.get("role"), message.get("content")
    if not isinstance(role, str) or role not in MESSAGE_ROLES:
        found = "no role" if role is None else f"role {role!r}"
        raise _RowError(
            "malformed message", name, f"{where} has {found}; role must be one of {sorted(MESSAGE_ROLES)}"
        )
    if not isinstance(content, str):
        raise _RowError(
            "malformed message",
            name,
            f"{where} has content of type {type(content).__name__}; content must be a string",
        )
    # Arrow-backed sources (Parquet, datasets) give every message every key seen in the column, set to None
    # where absent; dropping None-valued extras keeps the pair id the same whichever file type held the rows.
    return {key: item for key, item in message.items() if item is not None}


def _blank(messages: list[dict]) -> bool:
    return not any(message["content"].strip() for message in messages)


def _split_implicit(chosen: Any, rejected: Any) -> tuple[list[dict], list[dict], list[dict]]:
    """Split two whole conversations into (shared prompt, chosen remainder, rejected remainder)."""
    if isinstance(chosen, str) or isinstance(rejected, str):
        raise _RowError(
            "missing field 'prompt'",
            "prompt",
            "no 'prompt' field and chosen/rejected are strings: "
            "implicit prompts need chosen/rejected as message lists (a shared string prefix is "
            "ambiguous); add a 'prompt' column",
        )
    chosen = _require_messages(chosen, "chosen", empty_reason="empty completion")
    rejected = _require_messages(rejected, "rejected", empty_reason="empty completion")
    if chosen == rejected:
        # Identical conversations share every message; the prompt is what precedes the final assistant turns.
        shared = len(chosen)
        while shared > 0 and chosen[shared - 1]["role"] == "assistant":
            shared -= 1
    else:
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
    if shared == 0:
        raise _RowError(
            "no shared prompt",
            "chosen",
            "no 'prompt' field, and chosen and rejected share no "
            "leading message, so no prompt can be inferred; add a 'prompt' column or start both "
            "conversations with the same prompt messages",
        )
    for name, conversation in (("chosen", chosen), ("rejected", rejected)):
        if shared == len(conversation):
            raise _RowError(
                "empty completion",
                name,
                f"{name} ends where the shared prompt ends (message "
                f"{shared - 1}), so its completion is empty",
            )
        if conversation[shared]["role"] != "assistant":
            raise _RowError(
                "completion not from assistant",
                name,
                f"chosen and rejected diverge at message "
                f"{shared}, a {conversation[shared]['role']!r} message in {name}; the part after the "
                "shared prompt must start with an assistant message",
            )
        _check_completion(conversation[shared:], name)
    return chosen[:shared], chosen[shared:], rejected[shared:]
