"""Tokenized splits cached on disk, keyed by what decides their tokens: a run on the same data file, tokenizers and
settings opens the stored pairs instead of reading and tokenizing the data again.

A split's entry is ``cache_dir/tokenized-<key>/``: one ``token_store`` directory per distinct tokenizer
(``view-<k>/``) and ``split.json`` (the read's account, the drops, which view reads which directory). The key is the
sha256 of the content the caller passes (the data's identity, the read settings, every view's tokenizer fingerprint,
the limits). An entry is built in a temporary directory and renamed into place when complete, so a killed build
leaves nothing that could be opened; an entry that does not open (a file deleted by hand) is rebuilt.

Never trusted blindly: ``split.json`` records each file's size and blake2b checksum, checked at every open; a file
that differs rebuilds the entry (one warning line naming it). The small files (offsets, prompt lengths, sequence
checksums, pair ids: ~40 bytes a pair) are hashed whole; ids.i32 (4 bytes a token, 7.7 GB for 1M UltraFeedback-length
pairs, which whole would cost seconds to minutes at every open) by its first and last MiB and 16 evenly spaced MiB
samples, and each of its sequences is checked against its own checksum when read (``token_store``), so damage the
samples miss is a ``CacheError`` at the read naming the entry to delete, never other tokens used.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mrpo.data.pairs import PairCounts, PairStream
from mrpo.data.sources import source_identity
from mrpo.data.token_store import IDS_FILE, STORE_FILES, PairWriter, StoredPairs
from mrpo.data.tokenization import ModelView, TokenizationResult, tokenize_for_models
from mrpo.errors import CacheError, write_failure

logger = logging.getLogger(__name__)

CACHE_VERSION = 2
"""Version of this layout; part of every key."""

SPLIT_FILE = "split.json"


@dataclass
class CachedSplit:
    """One split's tokenized pairs as stored, the account of its read, and whether it was found or built."""

    tokenization: TokenizationResult
    counts: PairCounts
    directory: Path
    found: bool


def split_key(content: dict[str, Any]) -> str:
    return hashlib.sha256(
        json.dumps({"version": CACHE_VERSION, **content}, sort_keys=True).encode()
    ).hexdigest()


def open_or_tokenize(
    root: str | os.PathLike,
    content: dict[str, Any],
    views: Sequence[ModelView],
    stream: Callable[[], PairStream],
    *,
    max_length: Sequence[int | None],
    overflow: str,
    num_proc: int | None = None,
) -> CachedSplit:
    """The split stored under ``root`` for ``content``; if absent, read ``stream()`` once, tokenizing for every view
    straight to disk (``tokenize_for_models`` with a ``PairWriter`` per tokenizer, in ``num_proc`` worker
    processes), and store it. ``num_proc`` is not part of the key: the tokens are the same."""
    root = Path(root)
    directory = root / f"tokenized-{split_key(content)[:32]}"
    if (directory / SPLIT_FILE).is_file():
        try:
            found = _open(directory, views, found=True, source=content.get("source"))
            logger.warning("%s", _hit_line(found.directory, content.get("source")))
            return found
        except (OSError, ValueError, KeyError) as error:
            logger.warning("Tokenizing again: %s does not open (%s).", directory, error)
            shutil.rmtree(directory, ignore_errors=True)
    elif directory.exists():
        # Entries are renamed into place whole, so one without its account was damaged by hand: never a live build.
        logger.warning("Tokenizing again: %s is incomplete (it has no %s).", directory, SPLIT_FILE)
        shutil.rmtree(directory, ignore_errors=True)
    try:
        _build(
            root,
            directory,
            content,
            views,
            stream,
            max_length=max_length,
            overflow=overflow,
            num_proc=num_proc,
        )
    except OSError as error:
        message = write_failure(
            error,
            f"the tokenized cache under {root}",
            no_space=f"free space there (`mrpo cache prune --cache-dir {root}` removes stale entries), point "
            "cache_dir elsewhere, or set data.cache_tokenized=false",
            not_writable="point cache_dir at a writable directory, or set data.cache_tokenized=false",
        )
        if message is None or not _under(error.filename, root):
            raise  # not the cache's own write (a data file that does not read, say)
        raise CacheError(message) from error
    _note_older_entries(root, directory, content.get("source"))
    return _open(directory, views, found=False)


def _under(filename: Any, root: Path) -> bool:
    """Whether a failed write's file is under ``root`` (a write to an open file names none)."""
    if filename is None:
        return True
    return Path(os.fsdecode(filename)).resolve().is_relative_to(root.resolve())


def _build(
    root: Path,
    directory: Path,
    content: dict[str, Any],
    views: Sequence[ModelView],
    stream: Callable[[], PairStream],
    *,
    max_length: Sequence[int | None],
    overflow: str,
    num_proc: int | None,
) -> None:
    """Tokenize into a temporary build directory and rename it to ``directory`` when complete."""
    root.mkdir(parents=True, exist_ok=True)
    _sweep_abandoned_builds(root)
    building, lock = start_build(root, directory.name)
    try:
        account = _tokenize_into(
            building, content, views, stream, max_length=max_length, overflow=overflow, num_proc=num_proc
        )
        (building / SPLIT_FILE).write_text(json.dumps(account, indent=2, sort_keys=True), encoding="utf-8")
        building.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would keep other users of a shared cache out
        try:
            os.rename(building, directory)
        except OSError:
            if not (directory / SPLIT_FILE).is_file():
                raise
            # Another process stored the same entry first (it has the same content): use that one.
            shutil.rmtree(building, ignore_errors=True)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    finally:
        os.close(lock)  # releases the build's lock


def entry_source(directory: Path) -> tuple[list[str], str | None]:
    """A tokenized entry's data files and why it no longer serves (None: its source still matches, or it has no
    file to check). The same checks as an open: each file's size and modification time, then its checksum."""
    try:
        account = json.loads((directory / SPLIT_FILE).read_text(encoding="utf-8"))
        source, checksums = account["content"].get("source"), account["data_checksums"]
    except (OSError, ValueError, KeyError, AttributeError) as error:
        return [], f"unreadable ({SPLIT_FILE}: {getattr(error, 'strerror', None) or error})"
    files = _data_files(source)
    if not files:
        return [], None
    names = [str(file) for file in files]
    if not Path(source["path"]).exists():
        return names, "source gone"
    if source_identity(source["path"], source.get("split") or "train") != source:
        return names, "source changed (size, time or files)"
    try:
        if _data_checksums(source) != checksums:
            return names, "source changed (same size and time, other bytes)"
    except OSError:
        return names, "source changed (a file is gone)"
    return names, None


def _note_older_entries(root: Path, built: Path, source: Any) -> None:
    """One line after a build when entries of the same data whose source changed remain beside it."""
    if not _data_files(source):
        return
    older = []
    for directory in root.glob("tokenized-*"):
        if directory == built or not (directory / SPLIT_FILE).is_file():
            continue
        try:
            theirs = json.loads((directory / SPLIT_FILE).read_text(encoding="utf-8"))["content"].get("source")
        except (OSError, ValueError, KeyError, AttributeError):
            continue
        if isinstance(theirs, dict) and theirs.get("path") == source["path"] and entry_source(directory)[1]:
            older.append(directory)
    if older:
        logger.warning(
            "Tokenized entries of an older %s remain under %s: %d (`mrpo cache prune --cache-dir %s` removes "
            "them).",
            source["path"], root, len(older), root,
        )  # fmt: skip


def _tokenize_into(
    building: Path,
    content: dict[str, Any],
    views: Sequence[ModelView],
    stream: Callable[[], PairStream],
    *,
    max_length: Sequence[int | None],
    overflow: str,
    num_proc: int | None,
) -> dict[str, Any]:
    """Read ``stream()`` once, tokenizing for every view into ``building``; the entry's account."""
    data_checksums = _data_checksums(content.get("source"))  # before the read: what it reads is no older
    pairs = stream()
    result = tokenize_for_models(
        pairs,
        views,
        max_length=max_length,
        overflow=overflow,  # type: ignore[arg-type]
        # A store damaged as it is written (a failing disk) is found when it is read back: a new build starts afresh.
        storage=lambda k: PairWriter(
            building / f"view-{k}", remedy="run the command again (it is tokenized afresh)"
        ),
        num_proc=num_proc,
    )
    counts = pairs.counts()  # raises what an empty or all-invalid read raises
    return {
        "content": content,
        "view_names": result.view_names,
        "owners": result.owners,
        "dropped": dict(result.dropped),
        "read": counts.to_dict(),
        "files": _checksums(building, sorted(set(result.owners))),
        "data_checksums": data_checksums,
    }


BUILD_LOCK = ".build.lock"
"""The file in a build's directory whose lock (``fcntl.flock``) its process holds while it builds."""

_UNLOCKED_GRACE_S = 60.0
"""A build directory without its lock file is taken for dead only when older than this (a build creates the file
right after the directory)."""


def start_build(root: Path, name: str) -> tuple[Path, int]:
    """A new temporary build directory under ``root`` and the descriptor holding its lock (close it to release)."""
    building = Path(tempfile.mkdtemp(prefix=f".{name}-{_HOST}-{os.getpid()}-", dir=root))
    lock = os.open(building / BUILD_LOCK, os.O_CREAT | os.O_RDWR, 0o666)
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return building, lock


_HOST = socket.gethostname().replace("-", "_")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _sweep_abandoned_builds(root: Path) -> None:
    """Remove the temporary directories of builds that were stopped (killed, out of memory)."""
    for path in root.glob(".tokenized-*"):
        if build_is_dead(path):
            _remove_dead_build(path)


def lock_is_free(lock_file: Path) -> bool | None:
    """Whether no process holds the ``fcntl.flock`` of ``lock_file`` (None: there is no such file to lock).

    The kernel releases a process's locks when it ends, whatever host name or pid space it had (two containers
    may share both with separate processes), so a free lock is the one sure sign of a process gone.
    """
    try:
        lock = os.open(lock_file, os.O_RDWR)
    except FileNotFoundError:
        return None
    except OSError:
        return False  # not a file we wrote, or not ours to open: never taken for dead
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(lock)
    return True


def build_is_dead(path: Path) -> bool:
    """Whether the build directory ``path`` was left by a build that was stopped: its lock can be taken, or it
    has no lock file and is older than a build takes to create one."""
    free = lock_is_free(path / BUILD_LOCK)
    if free is None:
        try:
            return path.is_dir() and time.time() - path.stat().st_mtime > _UNLOCKED_GRACE_S
        except OSError:
            return False  # removed meanwhile
    return free


def _remove_dead_build(path: Path) -> None:
    logger.warning("Removing %s: the build that wrote it was stopped before it finished.", path)
    shutil.rmtree(path, ignore_errors=True)


SAMPLE_BYTES = 1 << 20
SAMPLES = 16


def sampled_digest(path: Path, whole: bool = False) -> str:
    """blake2b of a file's size and bytes: all of them (``whole``, or a file of at most 18 MiB), else its first
    and last MiB and ``SAMPLES`` evenly spaced MiB between."""
    size = path.stat().st_size
    digest = hashlib.blake2b(str(size).encode(), digest_size=16)
    with path.open("rb") as handle:
        if whole or size <= (SAMPLES + 2) * SAMPLE_BYTES:
            for block in iter(lambda: handle.read(SAMPLE_BYTES), b""):
                digest.update(block)
        else:
            starts = [0, *(size * (i + 1) // (SAMPLES + 1) for i in range(SAMPLES)), size - SAMPLE_BYTES]
            for start in starts:
                handle.seek(start)
                digest.update(handle.read(SAMPLE_BYTES))
    return digest.hexdigest()


def _checksums(directory: Path, owners: Sequence[int]) -> dict[str, str]:
    """Each store file's checksum under its path in the entry (ids.i32 sampled, the rest whole)."""
    return {
        f"view-{k}/{name}": sampled_digest(directory / f"view-{k}" / name, whole=name != IDS_FILE)
        for k in owners
        for name in STORE_FILES
    }


def _check_files(directory: Path, expected: dict[str, str]) -> None:
    for name, checksum in expected.items():
        if sampled_digest(directory / name, whole=not name.endswith(IDS_FILE)) != checksum:
            raise ValueError(f"{name} does not match the checksum written with it")


def _data_files(source: Any) -> list[Path]:
    """The files of a source identity (``sources.source_identity``), or none for another form of content."""
    if not isinstance(source, dict) or "files" not in source:
        return []
    path = Path(source["path"])
    return [path if source.get("split") is None else path / name for name, *_ in source["files"]]


def _data_checksums(source: Any) -> list[str]:
    return [sampled_digest(file) for file in _data_files(source)]


def _sampled(file: Path) -> bool:
    return file.stat().st_size > (SAMPLES + 2) * SAMPLE_BYTES


def _hit_line(directory: Path, source: Any) -> str:
    """The one visible line of a cache hit: what the entry was keyed on, and what that cannot see."""
    files = _data_files(source)
    if not files:
        return f"Tokens found in the cache: {directory}."
    sampled = [file.name for file in files if _sampled(file)]
    seen = (
        f"and a checksum of {', '.join(sampled)}'s first and last MiB and {SAMPLES} sampled MiB (an edit elsewhere "
        "that keeps the size and time is not seen: data.cache_tokenized=false reads the data again)"
        if sampled
        else "and a checksum of every byte"
    )
    return f"Tokens found in the cache: {directory} (keyed on {source['path']}'s size, modification time {seen})."


def _open(directory: Path, views: Sequence[ModelView], *, found: bool, source: Any = None) -> CachedSplit:
    account = json.loads((directory / SPLIT_FILE).read_text(encoding="utf-8"))
    owners = account["owners"]
    if len(owners) != len(views):
        raise ValueError(f"it holds {len(owners)} views, not {len(views)}")
    _check_files(directory, account["files"])
    if source is not None and account["data_checksums"] != _data_checksums(source):
        raise ValueError(
            f"{source['path']} changed since it was tokenized (same size and modification time, other bytes)"
        )
    remedy = f"delete {directory} and run the command again (it is tokenized afresh)"
    stored = {k: StoredPairs(directory / f"view-{k}", remedy=remedy) for k in sorted(set(owners))}
    if len({len(pairs) for pairs in stored.values()}) > 1:
        raise ValueError("its views hold different numbers of pairs")
    tokenization = TokenizationResult(
        view_names=[view.name for view in views],
        per_view=[stored[owner] for owner in owners],
        dropped=Counter(account["dropped"]),
        owners=owners,
    )
    return CachedSplit(tokenization, PairCounts.from_dict(account["read"]), directory, found)
