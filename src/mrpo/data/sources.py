"""Read preference pairs (prompt, chosen, rejected) from files, saved datasets, hub datasets or memory.

Sources: ``.jsonl`` (or gzip-compressed ``.jsonl.gz``, as HH-RLHF is published), ``.json`` (a list of objects or ``{"data": [...]}``), ``.parquet``, a directory written by
``datasets``' ``save_to_disk``, a Hugging Face hub dataset id, or in-memory records. Each source yields rows with
a label saying where each row is; ``pairs.py`` turns them into validated pairs (the three formats, the errors that
name file, row and field, the counted drops).
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mrpo.data.pairs import (
    Format,
    OnError,
    PairSet,
    PairStream,
    Rows,
    build_pair_set,
)
from mrpo.data.rows import RowError
from mrpo.errors import DataError

__all__ = [
    "load_pairs",
    "pairs_from_records",
    "source_identity",
    "stream_pairs",
]

SUPPORTED_SOURCES = (
    '.jsonl, .jsonl.gz, .json (a list of objects or {"data": [...]}), .parquet, a directory written by '
    "datasets' save_to_disk, or a Hugging Face hub dataset id"
)
_FORMATS = ("auto", "standard", "conversational", "implicit")
_ON_ERROR = ("raise", "drop")
# A hub id is "name" or "owner/name"; anything else that does not exist locally is a mistyped path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
_FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")


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
    cap_name: str = "max_pairs",
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
        cap_name: the setting ``max_pairs`` came from, as the drop count names it ("max_eval_pairs" for held-out).
    """
    _check_options(on_error, fmt)
    label, rows = _open_source(source, split)
    return build_pair_set(
        rows,
        label,
        max_pairs=max_pairs,
        seed=seed,
        on_error=on_error,
        fmt=fmt,
        drop_identical=drop_identical,
        cap_name=cap_name,
    )


def stream_pairs(
    source: str | os.PathLike,
    *,
    split: str = "train",
    on_error: OnError = "raise",
    fmt: Format = "auto",
    drop_identical: bool = False,
) -> PairStream:
    """The pairs of ``source`` one at a time, by the rules of :func:`load_pairs` (without subsampling), for data
    that should not be held in memory whole; the stream's ``counts()`` is the account ``load_pairs`` gives."""
    _check_options(on_error, fmt)
    label, rows = _open_source(source, split)
    return PairStream(rows, label, on_error=on_error, fmt=fmt, drop_identical=drop_identical)


def source_identity(source: str | os.PathLike, split: str = "train") -> dict[str, Any] | None:
    """What identifies a local source's content cheaply: its path and each file's size and modification time
    (as ``make`` judges a file changed); None for a hub dataset, whose files are not ours to watch.

    Reading every byte would be exact, and costs seconds per GB on every run; an edit that keeps a file's size and
    modification time is the case this misses.
    """
    path = Path(source).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    else:
        return None
    return {
        "path": str(path.resolve()),
        "split": split if path.is_dir() else None,
        "files": [[str(f.relative_to(path)) if path.is_dir() else f.name, *_stat(f)] for f in files],
    }


def _stat(file: Path) -> tuple[int, int]:
    status = file.stat()
    return status.st_size, status.st_mtime_ns


def pairs_from_records(
    records: Iterable[dict],
    *,
    source: str = "<memory>",
    max_pairs: int | None = None,
    seed: int = 0,
    on_error: OnError = "raise",
    fmt: Format = "auto",
    drop_identical: bool = False,
    cap_name: str = "max_pairs",
) -> PairSet:
    """Validate in-memory rows (dicts) exactly as :func:`load_pairs` validates the rows of a file."""
    _check_options(on_error, fmt)
    rows = ((f"row index {index} (0-based)", record) for index, record in enumerate(records))
    return build_pair_set(
        rows,
        source,
        max_pairs=max_pairs,
        seed=seed,
        on_error=on_error,
        fmt=fmt,
        drop_identical=drop_identical,
        cap_name=cap_name,
    )


# --------------------------------------------------------------------------------------------------------------
# Sources: each yields (row label, row) where the label says where the row is, for error messages.


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
        if path.name.lower().endswith(".jsonl.gz"):
            return label, _gzip_jsonl_rows(path, label)
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


def _gzip_jsonl_rows(path: Path, label: str) -> Rows:
    rows = _jsonl_rows(path, label, opener=gzip.open)
    where = "the start"
    try:
        for where, row in rows:
            yield where, row
    except (OSError, EOFError) as error:  # gzip.BadGzipFile is an OSError; a cut file ends in EOFError
        raise DataError(
            f"{label}: cannot decompress after {where} ({type(error).__name__}: {error}); the file is not gzip or "
            "is cut short.",
            source=label,
        ) from error


def _jsonl_rows(path: Path, label: str, *, opener: Any = open) -> Rows:
    # Read bytes line by line so that bad encoding or bad JSON is reported with its line number.
    with opener(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            where = f"line {line_number}"
            try:
                text = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                yield (
                    where,
                    RowError(
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
                    RowError(
                        "invalid JSON",
                        None,
                        f"invalid JSON at column {error.colno}: {error.msg}; "
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
                f"{path}: no split {split!r}; available splits: {sorted(loaded)}. Set data.train_split (or "
                "data.eval_split) to one of them",
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
