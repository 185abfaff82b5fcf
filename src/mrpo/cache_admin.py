"""What lies under a cache_dir, and removing what can no longer serve: ``mrpo cache ls`` and ``mrpo cache prune``.

Three kinds of directories live there. A tokenized entry (``tokenized-<key>/``, ``data/token_cache.py``) serves as long
as its data file is the one it was tokenized from (the checks an open makes); every edit of a data file adds an
entry and the old one is never read again. A build directory (``.tokenized-<key>-…``) is either a live build or
the leftover of one that was stopped: dead if and only if its lock can be taken. A reference store (``store-<key>/``,
``references``) is shared by every data set scoring with its model, so nothing says it is unused; only a store
that cannot be opened (its ``key.json`` missing or unreadable, no run filling it) is removed, and only when asked.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from mrpo.data.token_cache import build_is_dead, entry_source, lock_is_free

STORE_PREFIX, STORE_KEY_FILE, STORE_LOCK_FILE = "store-", "key.json", ".lock"
"""A reference store's directory prefix, key file and lock (``reference_store.store_directory``, ``store_lock``):
named here so that listing a cache does not import torch."""


@dataclass(frozen=True)
class CacheEntry:
    """One directory under a cache_dir, what it holds and whether prune removes it."""

    path: Path
    kind: str
    """"tokenized", "build" or "store"."""
    size: int
    """Bytes of its files."""
    age_s: float
    """Seconds since it was last written."""
    sources: tuple[str, ...]
    """The data files a tokenized entry was read from."""
    state: str
    """"current", "live build", "source changed (...)", "dead build", "unreadable (...)", ..."""
    stale: bool
    """Whether ``prune`` removes it (a store: only with ``references=True``)."""


def list_cache(root: str | os.PathLike) -> list[CacheEntry]:
    """Every entry, build and store under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.iterdir()):
        if not path.is_dir() or path.is_symlink():
            continue
        if path.name.startswith("tokenized-"):
            sources, why = entry_source(path)
            found.append(_entry(path, "tokenized", why or "current", why is not None, sources))
        elif path.name.startswith(".tokenized-"):
            dead = build_is_dead(path)
            found.append(_entry(path, "build", "dead build" if dead else "live build", dead))
        elif path.name.startswith(STORE_PREFIX):
            found.append(_store_entry(path))
    return sorted(found, key=lambda entry: (-entry.age_s, str(entry.path)))  # oldest first; ties by path


def _store_entry(path: Path) -> CacheEntry:
    shards = len(list(path.glob("shard-*.pt")))
    try:
        json.loads((path / STORE_KEY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        # A store without its key was never opened for scoring, or damaged; removed only if no run fills it.
        filling = lock_is_free(path / STORE_LOCK_FILE) is False
        why = f"{STORE_KEY_FILE} unreadable ({getattr(error, 'strerror', None) or error})"
        return _entry(path, "store", f"{why}, being filled" if filling else why, not filling)
    return _entry(path, "store", f"{shards} shard{'s' * (shards != 1)}", False)


def _entry(path: Path, kind: str, state: str, stale: bool, sources=()) -> CacheEntry:
    size, newest = 0, path.lstat().st_mtime
    for file in path.rglob("*"):
        try:
            status = file.lstat()
        except OSError:
            continue  # removed meanwhile
        size += status.st_size if file.is_file() else 0
        newest = max(newest, status.st_mtime)
    return CacheEntry(path, kind, size, max(0.0, time.time() - newest), tuple(sources), state, stale)


def prune_cache(
    root: str | os.PathLike, *, dry_run: bool = False, references: bool = False, source: str | None = None
) -> list[CacheEntry]:
    """Remove the stale tokenized entries and dead builds under ``root`` (and, with ``references``, the stores
    that cannot be opened; with ``source``, every tokenized entry of that data file or directory, matching or
    not); what was (with ``dry_run``: would be) removed."""
    chosen = Path(source).expanduser().resolve() if source else None
    removed = []
    for entry in list_cache(root):
        of_source = chosen is not None and entry.kind == "tokenized" and _reads(entry, chosen)
        if (entry.stale and (entry.kind != "store" or references)) or of_source:
            if not dry_run:
                shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry)
    return removed


def _reads(entry: CacheEntry, source: Path) -> bool:
    return any(Path(file) == source or source in Path(file).parents for file in entry.sources)


def format_size(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def format_age(seconds: float) -> str:
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{seconds / length:.0f}{unit}"
    return f"{seconds:.0f}s"


def format_listing(root: str | os.PathLike, entries: list[CacheEntry]) -> str:
    """The table ``mrpo cache ls`` prints, and a last line saying what prune would remove."""
    if not entries:
        return f"{root}: nothing cached"
    lines = [f"{'kind':<10} {'size':>9} {'age':>5}  {'state':<40} path / source"]
    for entry in entries:
        mark = "*" if entry.stale else " "
        lines.append(
            f"{entry.kind:<10} {format_size(entry.size):>9} {format_age(entry.age_s):>5} {mark}{entry.state:<40} "
            f"{entry.path.name}" + (f"  <- {', '.join(entry.sources)}" if entry.sources else "")
        )
    stale = [entry for entry in entries if entry.stale]
    total = format_size(sum(entry.size for entry in entries))
    lines.append(f"{len(entries)} in {root} ({total}); * = `mrpo cache prune --cache-dir {root}` removes it")
    if any(entry.kind == "store" for entry in stale):
        lines[-1] += " (a store only with --references)"
    return "\n".join(lines)
